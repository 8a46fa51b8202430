// bench/bench_report.hpp — collects Google Benchmark results in-process and prints
// "peer against ferry" ratio tables with goals beside them (DESIGN.md principle 6).
//
//     ferry_bench::collecting_reporter reporter;            // prints the usual console rows
//     benchmark::RunSpecifiedBenchmarks(&reporter);          // ... and remembers every run
//     const ferry_bench::result_store& r = reporter.results();
//
//     ferry_bench::ratio_table t("empty tasks, 1 submitter, 2 workers", "ferry",
//                                {{"Mitems/s", ferry_bench::better::higher, 1e-6}});
//     t.add_row("ferry", {r.counter("tp/ferry", "items_per_second")});
//     t.add_row("asio", {r.counter("tp/asio", "items_per_second")},
//               ferry_bench::goal::advantage_at_least(3.0));
//     ferry_bench::goal_tally tally;
//     t.print(std::cout, &tally);
//     tally.print(std::cout);                                // "goals: 1 PASS, 0 MISS"
//
// Results are keyed by the name the benchmark was registered under (without the
// "/min_time:..", "/real_time" decorations Google Benchmark appends); aggregates of
// repeated runs are stored as "<name>_<aggregate>" and looked up in preference (median,
// then mean) when a name was repeated.
//
// "Advantage" always reads the same way, whatever the metric: how many times better the
// baseline row is than this row. For higher-is-better figures it is baseline/peer, for
// lower-is-better ones peer/baseline; > 1 means the baseline wins.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace ferry_bench {

// --- collecting results -------------------------------------------------------------------

struct run_record {
  std::string name;            // registered name (function_name), "_<aggregate>" appended
  bool error = false;
  std::string error_message;
  double iterations = 0;
  double real_ns = 0;          // real time per iteration
  double cpu_ns = 0;           // CPU time per iteration (of the benchmark thread)
  std::map<std::string, double> counters;  // user counters, rates already divided out
};

class result_store {
public:
  void add(run_record r) {
    std::string key = r.name;
    records_[std::move(key)] = std::move(r);
  }

  // The record for `name`, preferring the median then the mean aggregate of a repeated
  // benchmark; nullptr when the benchmark did not run (filtered out) or failed.
  const run_record* find(const std::string& name) const {
    for (const char* suffix : {"_median", "_mean", ""}) {
      auto it = records_.find(name + suffix);
      if (it != records_.end() && !it->second.error) return &it->second;
    }
    return nullptr;
  }

  std::optional<double> counter(const std::string& name, const std::string& key) const {
    const run_record* r = find(name);
    if (!r) return std::nullopt;
    auto it = r->counters.find(key);
    if (it == r->counters.end()) return std::nullopt;
    return it->second;
  }

  std::optional<double> items_per_second(const std::string& name) const {
    return counter(name, "items_per_second");
  }

  std::optional<double> real_ns(const std::string& name) const {
    const run_record* r = find(name);
    if (!r) return std::nullopt;
    return r->real_ns;
  }

  // Runs that reported an error (SkipWithError), for a closing remark.
  std::vector<const run_record*> failures() const {
    std::vector<const run_record*> out;
    for (const auto& [key, r] : records_) {
      if (r.error) out.push_back(&r);
    }
    return out;
  }

  bool empty() const noexcept { return records_.empty(); }

private:
  std::map<std::string, run_record> records_;
};

// The console reporter, plus a copy of every run kept for the summary tables.
class collecting_reporter : public benchmark::ConsoleReporter {
public:
  explicit collecting_reporter(OutputOptions options = OO_None)
      : benchmark::ConsoleReporter(options) {}

  void ReportRuns(const std::vector<Run>& runs) override {
    benchmark::ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) results_.add(to_record(run));
  }

  const result_store& results() const noexcept { return results_; }

private:
  static run_record to_record(const Run& run) {
    run_record r;
    r.name = run.run_name.function_name;
    if (run.run_type == Run::RT_Aggregate) r.name += "_" + run.aggregate_name;
    r.error = run.error_occurred;
    r.error_message = run.error_message;
    r.iterations = static_cast<double>(run.iterations);
    const double to_ns = 1e9 / benchmark::GetTimeUnitMultiplier(run.time_unit);
    r.real_ns = run.GetAdjustedRealTime() * to_ns;
    r.cpu_ns = run.GetAdjustedCPUTime() * to_ns;
    for (const auto& [key, c] : run.counters) r.counters[key] = c.value;
    return r;
  }

  result_store results_;
};

// --- ratio tables -----------------------------------------------------------------------

enum class better { higher, lower };

struct column_spec {
  std::string header;          // the figure, with its unit: "Mitems/s", "p50 ns"
  better direction = better::higher;
  double scale = 1.0;          // shown value = raw value * scale (goal thresholds too)
  int precision = 2;
  bool show_advantage = true;
};

// A goal attached to one row of a table, printed beside it with PASS/MISS.
struct goal {
  enum class kind {
    advantage_at_least,  // the baseline is at least `threshold` times better than this row
    value_at_most,       // this row's shown value <= threshold
    value_below,         // this row's shown value < threshold
  };
  kind what = kind::advantage_at_least;
  double threshold = 0;
  std::size_t column = 0;
  std::string text;  // empty: generated from the other fields

  static goal advantage_at_least(double factor, std::size_t column = 0, std::string text = {}) {
    return {kind::advantage_at_least, factor, column, std::move(text)};
  }
  static goal value_at_most(double limit, std::size_t column = 0, std::string text = {}) {
    return {kind::value_at_most, limit, column, std::move(text)};
  }
  static goal value_below(double limit, std::size_t column = 0, std::string text = {}) {
    return {kind::value_below, limit, column, std::move(text)};
  }
};

// Counts goal outcomes over several tables and prints one closing line.
class goal_tally {
public:
  void record(std::optional<bool> pass, std::string what) {
    if (!pass) {
      ++not_run_;
    } else if (*pass) {
      ++pass_;
    } else {
      ++miss_;
      missed_.push_back(std::move(what));
    }
  }
  std::size_t passed() const noexcept { return pass_; }
  std::size_t missed() const noexcept { return miss_; }
  std::size_t not_run() const noexcept { return not_run_; }

  void print(std::ostream& os) const {
    os << "goals: " << pass_ << " PASS, " << miss_ << " MISS";
    if (not_run_ != 0) os << ", " << not_run_ << " not measured";
    os << '\n';
    for (const std::string& m : missed_) os << "  MISS: " << m << '\n';
  }

private:
  std::size_t pass_ = 0;
  std::size_t miss_ = 0;
  std::size_t not_run_ = 0;
  std::vector<std::string> missed_;
};

inline std::string format_fixed(double v, int precision) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", precision, v);
  return buf;
}

class ratio_table {
public:
  ratio_table(std::string title, std::string baseline_label, std::vector<column_spec> columns)
      : title_(std::move(title)),
        baseline_(std::move(baseline_label)),
        columns_(std::move(columns)) {}

  // `values` holds one raw figure per column; std::nullopt where it was not measured.
  void add_row(std::string label, std::vector<std::optional<double>> values,
               std::optional<goal> g = std::nullopt) {
    values.resize(columns_.size());
    rows_.push_back({std::move(label), std::move(values), std::move(g)});
  }

  void add_note(std::string note) { notes_.push_back(std::move(note)); }

  // How many times better the baseline is than `label` in `column`, or nullopt when either
  // figure is missing. Infinity when the row's figure is the worst possible (zero for a
  // higher-is-better figure, or positive against a baseline of zero).
  std::optional<double> advantage(const std::string& label, std::size_t column) const {
    const auto base = value(baseline_, column);
    const auto v = value(label, column);
    if (!base || !v || column >= columns_.size()) return std::nullopt;
    return ratio(*base, *v, columns_[column].direction);
  }

  // True when at least one figure was measured (a --benchmark_filter may skip them all).
  bool has_data() const {
    return std::any_of(rows_.begin(), rows_.end(), [](const row& r) {
      return std::any_of(r.values.begin(), r.values.end(),
                         [](const std::optional<double>& v) { return v.has_value(); });
    });
  }

  // Prints the table; a table without any figure prints only its title. Goals are
  // recorded in `tally` (as "not measured" when their figure is missing).
  void print(std::ostream& os, goal_tally* tally = nullptr) const {
    if (!has_data()) {
      os << '\n' << title_ << "\n  (not run)\n";
      if (tally) {
        for (const row& r : rows_) {
          if (r.g) tally->record(std::nullopt, title_ + " / " + r.label);
        }
      }
      return;
    }
    std::vector<std::string> header{"peer"};
    for (const column_spec& c : columns_) {
      header.push_back(c.header);
      if (c.show_advantage) header.push_back("adv");
    }
    const bool any_goal =
        std::any_of(rows_.begin(), rows_.end(), [](const row& r) { return r.g.has_value(); });
    if (any_goal) header.push_back("goal");

    std::vector<std::vector<std::string>> cells;
    for (const row& r : rows_) {
      std::vector<std::string> line{r.label};
      for (std::size_t c = 0; c < columns_.size(); ++c) {
        const column_spec& spec = columns_[c];
        line.push_back(r.values[c] ? format_fixed(*r.values[c] * spec.scale, spec.precision)
                                   : std::string("-"));
        if (spec.show_advantage) {
          if (r.label == baseline_) {
            line.push_back(r.values[c] ? "(base)" : "-");
          } else {
            line.push_back(format_ratio(advantage(r.label, c)));
          }
        }
      }
      if (any_goal) {
        std::string text;
        if (r.g) {
          const auto [pass, detail] = evaluate(r, *r.g);
          text = goal_text(*r.g) + ": " + (!pass ? "not measured" : *pass ? "PASS" : "MISS");
          if (!detail.empty()) text += " (" + detail + ")";
          if (tally) tally->record(pass, title_ + " / " + r.label + ": " + goal_text(*r.g));
        }
        line.push_back(std::move(text));
      }
      cells.push_back(std::move(line));
    }

    std::vector<std::size_t> width(header.size(), 0);
    for (std::size_t i = 0; i < header.size(); ++i) width[i] = header[i].size();
    for (const auto& line : cells) {
      for (std::size_t i = 0; i < line.size(); ++i) width[i] = std::max(width[i], line[i].size());
    }

    os << '\n' << title_ << '\n';
    for (const column_spec& c : columns_) {
      os << "  " << c.header << ": "
         << (c.direction == better::higher ? "higher is better" : "lower is better");
      if (c.show_advantage) {
        os << "; adv = "
           << (c.direction == better::higher ? baseline_ + " / peer" : "peer / " + baseline_)
           << " (> 1: " << baseline_ << " is better)";
      }
      os << '\n';
    }
    for (const std::string& n : notes_) os << "  note: " << n << '\n';
    print_line(os, header, width, any_goal);
    std::size_t total = 0;
    for (std::size_t w : width) total += w + 2;
    os << "  " << std::string(total > 2 ? total - 2 : 0, '-') << '\n';
    for (const auto& line : cells) print_line(os, line, width, any_goal);
  }

private:
  struct row {
    std::string label;
    std::vector<std::optional<double>> values;
    std::optional<goal> g;
  };

  std::optional<double> value(const std::string& label, std::size_t column) const {
    for (const row& r : rows_) {
      if (r.label == label && column < r.values.size()) return r.values[column];
    }
    return std::nullopt;
  }

  static double ratio(double base, double v, better direction) {
    const double num = direction == better::higher ? base : v;
    const double den = direction == better::higher ? v : base;
    if (den == 0) return num == 0 ? 1.0 : HUGE_VAL;
    return num / den;
  }

  static std::string format_ratio(std::optional<double> r) {
    if (!r) return "-";
    if (std::isinf(*r)) return "inf";
    return format_fixed(*r, *r >= 100 ? 0 : 2) + "x";
  }

  std::string goal_text(const goal& g) const {
    if (!g.text.empty()) return g.text;
    const std::string header = g.column < columns_.size() ? columns_[g.column].header : "?";
    switch (g.what) {
      case goal::kind::advantage_at_least:
        return baseline_ + " >= " + format_fixed(g.threshold, 1) + "x";
      case goal::kind::value_at_most:
        return header + " <= " + format_fixed(g.threshold, 2);
      case goal::kind::value_below:
        return header + " < " + format_fixed(g.threshold, 2);
    }
    return {};
  }

  // {pass (nullopt: not measured), the measured figure the verdict rests on}
  std::pair<std::optional<bool>, std::string> evaluate(const row& r, const goal& g) const {
    if (g.column >= columns_.size()) return {std::nullopt, {}};
    const column_spec& spec = columns_[g.column];
    if (g.what == goal::kind::advantage_at_least) {
      const auto adv = advantage(r.label, g.column);
      if (!adv) return {std::nullopt, {}};
      return {*adv >= g.threshold, format_ratio(adv)};
    }
    const auto v = r.values[g.column];
    if (!v) return {std::nullopt, {}};
    const double shown = *v * spec.scale;
    const bool pass = g.what == goal::kind::value_at_most ? shown <= g.threshold
                                                          : shown < g.threshold;
    return {pass, format_fixed(shown, spec.precision)};
  }

  static void print_line(std::ostream& os, const std::vector<std::string>& line,
                         const std::vector<std::size_t>& width, bool last_is_goal) {
    os << ' ';
    for (std::size_t i = 0; i < line.size(); ++i) {
      const std::size_t pad = width[i] > line[i].size() ? width[i] - line[i].size() : 0;
      const bool last = i + 1 == line.size();
      os << ' ';
      // Labels and goals left-aligned, figures right-aligned.
      if (i == 0 || (last && last_is_goal)) {
        os << line[i] << std::string(last ? 0 : pad, ' ');
      } else {
        os << std::string(pad, ' ') << line[i];
      }
      os << ' ';
    }
    os << '\n';
  }

  std::string title_;
  std::string baseline_;
  std::vector<column_spec> columns_;
  std::vector<row> rows_;
  std::vector<std::string> notes_;
};

// Removes `--quick` from the command line. In quick mode it puts a short
// --benchmark_min_time first, so an explicit one later on the line still wins. The result
// is null-terminated as benchmark::Initialize expects; `argc` counts without the null.
struct command_line {
  bool quick = false;
  int argc = 0;
  std::vector<char*> argv;
};

inline command_line split_quick_flag(int argc, char** argv) {
  static char quick_min_time[] = "--benchmark_min_time=0.1";
  command_line out;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::strcmp(argv[i], "--quick") == 0) {
      out.quick = true;
    } else {
      out.argv.push_back(argv[i]);
    }
  }
  if (out.quick) out.argv.insert(out.argv.begin() + 1, quick_min_time);
  out.argc = static_cast<int>(out.argv.size());
  out.argv.push_back(nullptr);
  return out;
}

}  // namespace ferry_bench
