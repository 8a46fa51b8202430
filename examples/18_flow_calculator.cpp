// The calculator flow of the DFFML operations docs: `parse` turns a line ("3 + 4") into
// lhs, rhs and two condition flags; `add` runs only when is_add is true, `mult` only when
// is_mult is; the output is get_single(result). Several lines run at once, one run context
// each, and their values never mix. Each result's provenance says which operation made it.
// A line neither condition admits ("8 - 2") gets no result (output_missing), and one that
// does not parse fails its context (operation_error); the other contexts are unaffected.
// Then the same flow is loaded from a JSON description with ferry::flow::load_flow and a
// ferry::flow::registry (instance "times" runs the registered "mult") and run again.
#include <ferry/ferry.hpp>
#include <ferry/flow/context.hpp>
#include <ferry/flow/orchestrator.hpp>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace fl = ferry::flow;

namespace {

struct calc {
  fl::definition<std::string> line{"line"};
  fl::definition<int> lhs{"lhs"}, rhs{"rhs"}, result{"result"};
  fl::definition<bool> is_add{"is_add"}, is_mult{"is_mult"};
  // A plain function: the orchestrator runs it on a pool worker.
  fl::operation parse = fl::make_operation("parse")
                            .inputs(line)
                            .outputs(lhs, rhs, is_add, is_mult)
                            .implement([](const std::string& s) {
                              std::istringstream in(s);
                              int a = 0, b = 0;
                              char op = 0;
                              if (!(in >> a >> op >> b)) throw std::invalid_argument("cannot parse '" + s + "'");
                              return std::tuple{a, b, op == '+', op == '*'};
                            });
  // Coroutines: they run on the loop.
  fl::operation add = fl::make_operation("add")
                          .inputs(lhs, rhs)
                          .outputs(result)
                          .conditions(is_add)
                          .implement([](int a, int b) -> asio::awaitable<int> { co_return a + b; });
  fl::operation mult = fl::make_operation("mult")
                           .inputs(lhs, rhs)
                           .outputs(result)
                           .conditions(is_mult)
                           .implement([](int a, int b) -> asio::awaitable<int> { co_return a * b; });
  fl::output<int> answer = fl::get_single(result);
  fl::dataflow flow{{parse, add, mult}, {answer}, {.seeds = {line}}};
};

// The operation instance that produced the context's result (its provenance).
std::string made_by(const fl::context_result& r) {
  for (const auto& in : r.inputs) {
    if (in->definition().name() == "result") return in->from().instance;
  }
  return "nothing";
}

std::string message_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "<not a std::exception>";
  }
}

// Prints the contexts in name order; returns how many produced a result.
int print_results(std::vector<fl::context_result> done, const std::vector<std::pair<std::string, std::string>>& lines) {
  std::sort(done.begin(), done.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  int ok = 0;
  for (const auto& r : done) {
    std::string text;
    for (const auto& [name, line] : lines) {
      if (name == r.name) text = line;
    }
    if (r.ok()) {
      ++ok;
      std::printf("  %-4s %-8s = %-4d (by %s)\n", r.name.c_str(), text.c_str(), r.results.get<int>("result"),
                  made_by(r).c_str());
    } else {
      std::printf("  %-4s %-8s : %s\n", r.name.c_str(), text.c_str(), message_of(r.error).c_str());
    }
  }
  return ok;
}

std::vector<fl::input_set> input_sets(const calc& c, const std::vector<std::pair<std::string, std::string>>& lines) {
  std::vector<fl::input_set> sets;
  for (const auto& [name, line] : lines) sets.emplace_back(name, std::vector{fl::seed(c.line, line)});
  return sets;
}

}  // namespace

int main() {
  calc c;
  const std::vector<std::pair<std::string, std::string>> lines = {
      {"c1", "3 + 4"}, {"c2", "6 * 7"}, {"c3", "10 + -3"}, {"c4", "12 * 12"},
      {"c5", "8 - 2"}, {"c6", "seven"}};

  // The same flow as a description: operations come from the registry by name, and the
  // definitions named by "seeds" and "outputs" must be registered too.
  fl::registry reg;
  reg.add(c.parse);
  reg.add(c.add);
  reg.add(c.mult);
  reg.add(c.line);
  reg.add(c.result);
  const std::string description = R"({
    "operations": { "parse": {"operation": "parse"},
                    "add":   {"operation": "add"},
                    "times": {"operation": "mult"} },
    "seeds": ["line"],
    "outputs": [ {"get_single": "result"} ]
  })";

  ferry::entrypoint ep{{.pool_size = 2}};
  auto main_task = [&]() -> asio::awaitable<int> {
    fl::context scope{ep.get_executor()};
    fl::orchestrator orch{scope};

    std::printf("calculator flow (built in C++), %zu contexts at once:\n", lines.size());
    auto run_op = orch.run(c.flow, input_sets(c, lines));
    std::vector<fl::context_result> done = co_await std::move(run_op);
    const int ok_built = print_results(std::move(done), lines);

    fl::dataflow loaded = fl::load_flow(description, reg);
    std::printf("calculator flow loaded from JSON (%zu operations:", loaded.operations().size());
    for (const auto& op : loaded.operations()) std::printf(" %s=%s", op.instance().c_str(), op.name().c_str());
    std::printf("), same lines:\n");
    auto run_loaded = orch.run(loaded, input_sets(c, lines));
    done = co_await std::move(run_loaded);
    const int ok_loaded = print_results(std::move(done), lines);

    auto close_op = orch.close();
    co_await std::move(close_op);
    auto close_scope = scope.close();
    co_await std::move(close_scope);
    co_return ok_built == 4 && ok_loaded == 4 ? 0 : 1;
  };
  return ep.run(main_task);
}
