// Parsing a JSON flow description (spec/flow-operations.md O15).
//
// The parser trusts nothing in the text: every field is type-checked before use and
// anything wrong is a ferry::error with errc::invalid_description whose message names the
// field. Nesting and size are capped before parsing, so hostile input cannot exhaust the
// stack or memory; tests/fuzz/flow_description_fuzz.cpp fuzzes this file.
#include "flow_description.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <initializer_list>

namespace ferry::flow::detail {

void description_error(const std::string& what) {
  throw ferry::error(make_error_code(errc::invalid_description), "ferry::flow::load_flow: " + what);
}

namespace {

using json = nlohmann::json;

constexpr std::size_t max_description_size = 1 << 20;
constexpr int max_depth = 32;

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
  if (!v.is_string()) description_error(where + " must be a string");
  return v.get_ref<const std::string&>();
}

const json::object_t& as_object(const json& v, const std::string& where) {
  if (!v.is_object()) description_error(where + " must be an object");
  return v.get_ref<const json::object_t&>();
}

const json::array_t& as_array(const json& v, const std::string& where) {
  if (!v.is_array()) description_error(where + " must be an array");
  return v.get_ref<const json::array_t&>();
}

void only_keys(const json::object_t& o, std::initializer_list<std::string_view> allowed,
               const std::string& where) {
  for (const auto& [k, v] : o) {
    if (std::find(allowed.begin(), allowed.end(), k) == allowed.end()) {
      description_error(where + ": unknown key '" + k + "'");
    }
  }
}

description_source parse_source(const json& v, const std::string& where) {
  description_source s;
  if (v.is_string()) {
    s.definition = v.get<std::string>();
    return s;
  }
  const auto& o = as_object(v, where);
  if (o.count("seed")) {
    only_keys(o, {"seed"}, where);
    s.kind = description_source::from::seed;
    s.definition = as_string(o.at("seed"), where + ".seed");
    return s;
  }
  if (o.count("instance")) {
    only_keys(o, {"instance", "output"}, where);
    if (!o.count("output")) description_error(where + ": an instance source needs \"output\"");
    s.kind = description_source::from::instance;
    s.instance = as_string(o.at("instance"), where + ".instance");
    s.definition = as_string(o.at("output"), where + ".output");
    return s;
  }
  description_error(where + ": a source is a definition name, {\"seed\": name} or "
                            "{\"instance\": i, \"output\": port}");
}

description_output parse_output(const json& v, const std::string& where) {
  const auto& o = as_object(v, where);
  description_output out;
  if (o.count("get_single")) {
    only_keys(o, {"get_single", "pick"}, where);
    out.definition = as_string(o.at("get_single"), where + ".get_single");
    if (o.count("pick")) {
      const std::string& p = as_string(o.at("pick"), where + ".pick");
      if (p == "only") {
        out.how = description_output::pick::only;
      } else if (p == "first") {
        out.how = description_output::pick::first;
      } else if (p == "last") {
        out.how = description_output::pick::last;
      } else {
        description_error(where + ".pick: '" + p + "' is not one of only, first, last");
      }
    }
    return out;
  }
  if (o.count("get_multi")) {
    only_keys(o, {"get_multi"}, where);
    out.what = description_output::kind::multi;
    out.definition = as_string(o.at("get_multi"), where + ".get_multi");
    return out;
  }
  description_error(where + ": an output is {\"get_single\": name[, \"pick\": ...]} or "
                            "{\"get_multi\": name}");
}

}  // namespace

flow_description parse_flow_description(std::string_view text) {
  if (text.size() > max_description_size) description_error("the description is larger than 1 MiB");
  if (nesting(text) > max_depth) description_error("the description nests deeper than 32 levels");
  json doc = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) description_error("not valid JSON");
  const auto& root = as_object(doc, "the description");
  only_keys(root, {"operations", "seeds", "strict", "outputs"}, "the description");

  flow_description d;
  if (root.count("strict")) {
    const json& s = root.at("strict");
    if (!s.is_boolean()) description_error("\"strict\" must be true or false");
    d.strict = s.get<bool>();
  }
  if (!root.count("operations")) description_error("\"operations\" is missing");
  for (const auto& [instance, body] : as_object(root.at("operations"), "\"operations\"")) {
    const std::string where = "operations." + instance;
    if (instance.empty()) description_error("an operation instance has an empty name");
    const auto& o = as_object(body, where);
    only_keys(o, {"operation", "inputs"}, where);
    if (!o.count("operation")) description_error(where + ": \"operation\" is missing");
    d.operations.push_back({instance, as_string(o.at("operation"), where + ".operation")});
    if (!o.count("inputs")) continue;
    for (const auto& [port, srcs] : as_object(o.at("inputs"), where + ".inputs")) {
      description_wiring w{instance, port, {}};
      const std::string pw = where + ".inputs." + port;
      if (srcs.is_array()) {
        const auto& arr = as_array(srcs, pw);
        for (std::size_t i = 0; i < arr.size(); ++i) {
          w.sources.push_back(parse_source(arr[i], pw + "[" + std::to_string(i) + "]"));
        }
      } else {
        w.sources.push_back(parse_source(srcs, pw));
      }
      if (w.sources.empty()) description_error(pw + ": no sources");
      d.wiring.push_back(std::move(w));
    }
  }
  if (root.count("seeds")) {
    const auto& arr = as_array(root.at("seeds"), "\"seeds\"");
    for (std::size_t i = 0; i < arr.size(); ++i) {
      d.seeds.push_back(as_string(arr[i], "seeds[" + std::to_string(i) + "]"));
    }
  }
  if (root.count("outputs")) {
    const auto& arr = as_array(root.at("outputs"), "\"outputs\"");
    for (std::size_t i = 0; i < arr.size(); ++i) {
      d.outputs.push_back(parse_output(arr[i], "outputs[" + std::to_string(i) + "]"));
    }
  }
  return d;
}

}  // namespace ferry::flow::detail
