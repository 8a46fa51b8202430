// The parsed form of a JSON flow description (internal). parse_flow_description checks
// syntax and schema only; load_flow (flow_json.cpp) then resolves names against a registry.
// This file and flow_description.cpp depend on nothing but the standard library, nlohmann
// and ferry/flow/error.hpp, so the fuzz target can build them with clang on their own.
#pragma once

#include <ferry/flow/error.hpp>

#include <string>
#include <string_view>
#include <vector>

namespace ferry::flow::detail {

struct description_source {
  enum class from { any, seed, instance } kind = from::any;
  std::string definition;  // the definition, or the output port for from::instance
  std::string instance;
};

struct description_wiring {
  std::string instance;
  std::string port;
  std::vector<description_source> sources;
};

struct description_operation {
  std::string instance;
  std::string operation;
};

struct description_output {
  enum class kind { single, multi } what = kind::single;
  std::string definition;
  enum class pick { only, first, last } how = pick::only;
};

struct flow_description {
  std::vector<description_operation> operations;
  std::vector<description_wiring> wiring;
  std::vector<std::string> seeds;
  bool strict = true;
  std::vector<description_output> outputs;
};

// Throws ferry::error(errc::invalid_description) naming the defect.
flow_description parse_flow_description(std::string_view text);

[[noreturn]] void description_error(const std::string& what);

}  // namespace ferry::flow::detail
