// Asphalt's pass_exception teardown: a unit of work commits its transaction when the scope
// ends cleanly and rolls it back when it ends with an exception. Shown with a plain
// pass_exception callback and with the context_teardown form, on both paths.
#include <ferry/ferry.hpp>
#include <ferry/flow/context.hpp>

#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// An in-memory stand-in that records what happened to it.
struct database {
  std::vector<std::string> journal;
  std::vector<std::string> pending;
  void insert(std::string row) { pending.push_back(std::move(row)); }
  void commit() {
    journal.push_back("commit " + std::to_string(pending.size()) + " row(s)");
    pending.clear();
  }
  void rollback() {
    journal.push_back("rollback " + std::to_string(pending.size()) + " row(s)");
    pending.clear();
  }
};

// Form 1: add_teardown_callback(fn, pass_exception).
void open_transaction(ferry::flow::context& ctx) {
  auto db = ctx.require<database>();
  ctx.add_teardown_callback(
      [db](std::exception_ptr e) {
        if (e) {
          db->rollback();
        } else {
          db->commit();
        }
      },
      ferry::flow::pass_exception);
}

// Form 2: context_teardown, the same pattern in one function.
asio::awaitable<void> transaction(ferry::flow::context& ctx, ferry::flow::closing_signal closing) {
  auto db = ctx.require<database>();
  std::exception_ptr e = co_await closing.wait();
  if (e) {
    db->rollback();
  } else {
    db->commit();
  }
}

asio::awaitable<void> unit_of_work(ferry::flow::context& root, bool fail, bool use_teardown_form) {
  try {
    co_await ferry::flow::scoped(root, [&](ferry::flow::context& uow) -> asio::awaitable<void> {
      if (use_teardown_form) {
        co_await ferry::flow::context_teardown(uow, transaction);
      } else {
        open_transaction(uow);
      }
      auto db = uow.require<database>();
      db->insert("alice");
      db->insert("bob");
      if (fail) throw std::runtime_error("payment declined");
    });
  } catch (const std::exception& e) {
    std::printf("  unit of work failed: %s\n", e.what());
  }
}

}  // namespace

int main() {
  ferry::entrypoint ep;
  return ep.run([&]() -> asio::awaitable<int> {
    ferry::flow::context root{ep.get_executor()};
    auto db = std::make_shared<database>();
    root.add_resource(db);
    for (bool teardown_form : {false, true}) {
      std::printf("%s:\n", teardown_form ? "context_teardown form" : "pass_exception callback");
      co_await unit_of_work(root, /*fail=*/false, teardown_form);
      co_await unit_of_work(root, /*fail=*/true, teardown_form);
    }
    for (const auto& line : db->journal) std::printf("journal: %s\n", line.c_str());
    co_await root.close();
    co_return db->journal.size() == 4 ? 0 : 1;
  });
}
