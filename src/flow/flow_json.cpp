// Loading a flow from a JSON description (spec/flow-operations.md O15).
//
// The loader trusts nothing in the text: every field is type-checked before use, every name
// is looked up before it is used, and anything wrong is a ferry::error with
// errc::invalid_description whose message names the field (flow construction then applies
// its own checks, which carry their own codes). Nesting is capped before parsing, so hostile
// input cannot exhaust the stack; tests/fuzz/flow_loader_fuzz.cpp fuzzes this file.
#include <ferry/flow/orchestrator.hpp>

#include <nlohmann/json.hpp>

#include <set>

namespace ferry::flow {

// --- registry --------------------------------------------------------------------------------

void registry::add(operation op) {
  const std::string name = op.name();
  if (!operations_.emplace(name, std::move(op)).second) {
    throw ferry::error(make_error_code(errc::duplicate_instance),
                       "ferry::flow::registry: an operation named '" + name + "' is already registered");
  }
}

void registry::add_definition(definition_entry e) {
  const std::string name = e.def.name();
  auto [it, fresh] = definitions_.emplace(name, e);
  if (!fresh && it->second.def.type() != e.def.type()) {
    throw ferry::error(make_error_code(errc::type_mismatch),
                       "ferry::flow::registry: definition '" + name + "' is registered as " +
                           it->second.def.type_name() + ", not " + e.def.type_name());
  }
}

const operation* registry::find_operation(std::string_view name) const {
  auto it = operations_.find(name);
  return it == operations_.end() ? nullptr : &it->second;
}

const registry::definition_entry* registry::find_definition(std::string_view name) const {
  auto it = definitions_.find(name);
  return it == definitions_.end() ? nullptr : &it->second;
}

// --- loader --------------------------------------------------------------------------------

namespace {

using json = nlohmann::json;

constexpr std::size_t max_description_size = 1 << 20;
constexpr int max_depth = 32;

[[noreturn]] void bad(const std::string& what) {
  throw ferry::error(make_error_code(errc::invalid_description), "ferry::flow::load_flow: " + what);
}

// Deepest [ / { nesting outside strings, stopping early once past the cap.
int nesting(std::string_view text) {
  int depth = 0;
  int deepest = 0;
  bool in_string = false;
  bool escaped = false;
  for (char ch : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (ch == '\\') {
        escaped = true;
      } else if (ch == '"') {
        in_string = false;
      }
      continue;
    }
    if (ch == '"') {
      in_string = true;
    } else if (ch == '[' || ch == '{') {
      deepest = std::max(deepest, ++depth);
      if (deepest > max_depth) return deepest;
    } else if (ch == ']' || ch == '}') {
      --depth;
    }
  }
  return deepest;
}

const std::string& as_string(const json& v, const std::string& where) {
  if (!v.is_string()) bad(where + " must be a string");
  return v.get_ref<const std::string&>();
}

const json::object_t& as_object(const json& v, const std::string& where) {
  if (!v.is_object()) bad(where + " must be an object");
  return v.get_ref<const json::object_t&>();
}

const json::array_t& as_array(const json& v, const std::string& where) {
  if (!v.is_array()) bad(where + " must be an array");
  return v.get_ref<const json::array_t&>();
}

void only_keys(const json::object_t& o, std::initializer_list<std::string_view> allowed,
               const std::string& where) {
  for (const auto& [k, v] : o) {
    if (std::find(allowed.begin(), allowed.end(), k) == allowed.end()) {
      bad(where + ": unknown key '" + k + "'");
    }
  }
}

source parse_source(const json& v, const std::string& where) {
  if (v.is_string()) return source::any(v.get<std::string>());
  const auto& o = as_object(v, where);
  if (o.count("seed")) {
    only_keys(o, {"seed"}, where);
    return source::seed(as_string(o.at("seed"), where + ".seed"));
  }
  if (o.count("instance")) {
    only_keys(o, {"instance", "output"}, where);
    if (!o.count("output")) bad(where + ": an instance source needs \"output\"");
    return source::output(as_string(o.at("instance"), where + ".instance"),
                          as_string(o.at("output"), where + ".output"));
  }
  bad(where + ": a source is a definition name, {\"seed\": name} or {\"instance\": i, \"output\": port}");
}

}  // namespace

dataflow load_flow(std::string_view text, const registry& reg) {
  if (text.size() > max_description_size) bad("the description is larger than 1 MiB");
  if (nesting(text) > max_depth) bad("the description nests deeper than 32 levels");
  json doc = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) bad("not valid JSON");
  const auto& root = as_object(doc, "the description");
  only_keys(root, {"operations", "seeds", "strict", "outputs"}, "the description");

  flow_options options;
  if (root.count("strict")) {
    const json& s = root.at("strict");
    if (!s.is_boolean()) bad("\"strict\" must be true or false");
    options.strict = s.get<bool>();
  }

  if (!root.count("operations")) bad("\"operations\" is missing");
  std::vector<operation> ops;
  std::map<std::string, any_definition, std::less<>> carried;  // definitions on used ports
  for (const auto& [instance, body] : as_object(root.at("operations"), "\"operations\"")) {
    const std::string where = "operations." + instance;
    if (instance.empty()) bad("an operation instance has an empty name");
    const auto& o = as_object(body, where);
    only_keys(o, {"operation", "inputs"}, where);
    if (!o.count("operation")) bad(where + ": \"operation\" is missing");
    const std::string& opname = as_string(o.at("operation"), where + ".operation");
    const operation* op = reg.find_operation(opname);
    if (!op) bad(where + ": no operation named '" + opname + "' is registered");
    ops.push_back(op->as(instance));
    for (const port& p : op->inputs()) carried.emplace(p.def.name(), p.def);
    for (const port& p : op->outputs()) carried.emplace(p.def.name(), p.def);
    for (const any_definition& c : op->conditions()) carried.emplace(c.name(), c);
    if (o.count("inputs")) {
      for (const auto& [portname, srcs] : as_object(o.at("inputs"), where + ".inputs")) {
        wiring w{instance, portname, {}};
        const std::string pw = where + ".inputs." + portname;
        if (srcs.is_array()) {
          const auto& arr = as_array(srcs, pw);
          for (std::size_t i = 0; i < arr.size(); ++i) {
            w.sources.push_back(parse_source(arr[i], pw + "[" + std::to_string(i) + "]"));
          }
        } else {
          w.sources.push_back(parse_source(srcs, pw));
        }
        if (w.sources.empty()) bad(pw + ": no sources");
        options.wiring.push_back(std::move(w));
      }
    }
  }

  auto find_def = [&](const std::string& name, const std::string& where) -> any_definition {
    if (const auto* e = reg.find_definition(name)) return e->def;
    auto it = carried.find(name);
    if (it == carried.end()) bad(where + ": no definition named '" + name + "'");
    return it->second;
  };

  if (root.count("seeds")) {
    const auto& arr = as_array(root.at("seeds"), "\"seeds\"");
    for (std::size_t i = 0; i < arr.size(); ++i) {
      const std::string where = "seeds[" + std::to_string(i) + "]";
      options.seeds.push_back(find_def(as_string(arr[i], where), where));
    }
  }

  std::vector<output_spec> outputs;
  if (root.count("outputs")) {
    const auto& arr = as_array(root.at("outputs"), "\"outputs\"");
    for (std::size_t i = 0; i < arr.size(); ++i) {
      const std::string where = "outputs[" + std::to_string(i) + "]";
      const auto& o = as_object(arr[i], where);
      if (o.count("get_single")) {
        only_keys(o, {"get_single", "pick"}, where);
        const std::string& name = as_string(o.at("get_single"), where + ".get_single");
        const auto* e = reg.find_definition(name);
        if (!e) bad(where + ": definition '" + name + "' is not registered (registry::add(definition))");
        pick how = pick::only;
        if (o.count("pick")) {
          const std::string& p = as_string(o.at("pick"), where + ".pick");
          if (p == "only") {
            how = pick::only;
          } else if (p == "first") {
            how = pick::first;
          } else if (p == "last") {
            how = pick::last;
          } else {
            bad(where + ".pick: '" + p + "' is not one of only, first, last");
          }
        }
        outputs.push_back(e->single(how));
      } else if (o.count("get_multi")) {
        only_keys(o, {"get_multi"}, where);
        const std::string& name = as_string(o.at("get_multi"), where + ".get_multi");
        const auto* e = reg.find_definition(name);
        if (!e) bad(where + ": definition '" + name + "' is not registered (registry::add(definition))");
        outputs.push_back(e->multi());
      } else {
        bad(where + ": an output is {\"get_single\": name[, \"pick\": ...]} or {\"get_multi\": name}");
      }
    }
  }

  return dataflow(std::move(ops), std::move(outputs), std::move(options));
}

}  // namespace ferry::flow
