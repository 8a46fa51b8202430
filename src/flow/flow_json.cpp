// The registry and load_flow (spec/flow-operations.md O15): the description is parsed and
// schema-checked by flow_description.cpp, then every name is resolved here (an unknown
// operation or definition is errc::invalid_description naming it) and the dataflow's own
// construction applies its checks, with their own codes.
#include <ferry/flow/orchestrator.hpp>

#include "flow_description.hpp"

#include <map>
#include <string>

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

dataflow load_flow(std::string_view text, const registry& reg) {
  using detail::description_error;
  const detail::flow_description d = detail::parse_flow_description(text);

  flow_options options;
  options.strict = d.strict;
  std::vector<operation> ops;
  std::map<std::string, any_definition, std::less<>> carried;  // definitions on used ports
  for (const auto& o : d.operations) {
    const operation* op = reg.find_operation(o.operation);
    if (!op) {
      description_error("operations." + o.instance + ": no operation named '" + o.operation +
                        "' is registered");
    }
    ops.push_back(op->as(o.instance));
    for (const port& p : op->inputs()) carried.emplace(p.def.name(), p.def);
    for (const port& p : op->outputs()) carried.emplace(p.def.name(), p.def);
    for (const any_definition& c : op->conditions()) carried.emplace(c.name(), c);
  }
  for (const auto& w : d.wiring) {
    wiring out{w.instance, w.port, {}};
    for (const auto& s : w.sources) {
      switch (s.kind) {
        case detail::description_source::from::any: out.sources.push_back(source::any(s.definition)); break;
        case detail::description_source::from::seed: out.sources.push_back(source::seed(s.definition)); break;
        case detail::description_source::from::instance:
          out.sources.push_back(source::output(s.instance, s.definition));
          break;
      }
    }
    options.wiring.push_back(std::move(out));
  }
  for (std::size_t i = 0; i < d.seeds.size(); ++i) {
    const std::string& name = d.seeds[i];
    if (const auto* e = reg.find_definition(name)) {
      options.seeds.push_back(e->def);
    } else if (auto it = carried.find(name); it != carried.end()) {
      options.seeds.push_back(it->second);
    } else {
      description_error("seeds[" + std::to_string(i) + "]: no definition named '" + name + "'");
    }
  }
  std::vector<output_spec> outputs;
  for (std::size_t i = 0; i < d.outputs.size(); ++i) {
    const auto& o = d.outputs[i];
    const auto* e = reg.find_definition(o.definition);
    if (!e) {
      description_error("outputs[" + std::to_string(i) + "]: definition '" + o.definition +
                        "' is not registered (registry::add(definition))");
    }
    if (o.what == detail::description_output::kind::multi) {
      outputs.push_back(e->multi());
    } else {
      outputs.push_back(e->single(o.how == detail::description_output::pick::first  ? pick::first
                                  : o.how == detail::description_output::pick::last ? pick::last
                                                                                    : pick::only));
    }
  }
  return dataflow(std::move(ops), std::move(outputs), std::move(options));
}

}  // namespace ferry::flow
