// The orchestrator: per-context input networks, Cartesian dispatch, conditions, locks,
// completion, stages and outputs (spec/flow-operations.md O5–O14).
//
// Threading: everything in here runs on the orchestrator's executor, which (like
// flow::context's) must not run two handlers at once. So the state below needs no locks; the
// only other threads involved are pool workers running plain-function implementations, and
// they touch nothing but their own run's inputs (immutable) and their result.
#include <ferry/flow/orchestrator.hpp>
#include <ferry/flow/detail/loop_event.hpp>
#include <ferry/threaded.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <atomic>
#include <deque>
#include <iostream>
#include <set>

namespace ferry::flow {

// --- definitions, inputs, errors -----------------------------------------------------------

namespace detail {

std::shared_ptr<const definition_info> make_definition_info(std::string name,
                                                            std::type_index type,
                                                            std::string type_name, bool lock,
                                                            value_ptr default_value,
                                                            std::function<bool(const void*)> v) {
  if (name.empty()) {
    throw ferry::error(make_error_code(errc::invalid_name),
                       "ferry::flow::definition: the name must not be empty");
  }
  return std::make_shared<const definition_info>(definition_info{
      std::move(name), type, std::move(type_name), lock, std::move(default_value), std::move(v)});
}

void throw_output_missing(const std::string& context, const std::string& kind,
                          const std::string& definition, const std::string& why) {
  throw ferry::error(make_error_code(errc::output_missing),
                     kind + "('" + definition + "') in context '" + context + "': " + why);
}

input_ptr nearest_ancestor(const input_ptr& in, const std::string& definition) {
  std::deque<input_ptr> todo(in->parents().begin(), in->parents().end());
  std::set<std::uint64_t> seen;
  while (!todo.empty()) {
    input_ptr p = std::move(todo.front());
    todo.pop_front();
    if (!seen.insert(p->id()).second) continue;
    if (p->definition().name() == definition) return p;
    todo.insert(todo.end(), p->parents().begin(), p->parents().end());
  }
  return nullptr;
}

namespace {
std::atomic<std::uint64_t> next_input_id{0};
std::atomic<std::uint64_t> next_context_id{0};

std::string describe(const input_ptr& in) {
  std::string s = in->definition().name() + "#" + std::to_string(in->id());
  s += in->from().seed() ? " (seed)" : " (from " + in->from().instance + "." + in->from().output + ")";
  return s;
}

}  // namespace

}  // namespace detail

operation_error::operation_error(std::string instance, std::string context,
                                 std::vector<std::shared_ptr<const input>> inputs,
                                 std::exception_ptr cause)
    : ferry::error(make_error_code(errc::operation_failed),
                   [&] {
                     std::string m = "operation '" + instance + "' failed in context '" +
                                     context + "' on inputs [";
                     for (std::size_t i = 0; i < inputs.size(); ++i) {
                       if (i) m += ", ";
                       m += detail::describe(inputs[i]);
                     }
                     return m + "]: " + describe_exception(cause);
                   }()),
      instance_(std::move(instance)),
      context_(std::move(context)),
      inputs_(std::move(inputs)),
      cause_(std::move(cause)) {}

operation_builder<detail::type_list<>, detail::type_list<>> make_operation(std::string name) {
  if (name.empty()) {
    throw ferry::error(make_error_code(errc::invalid_name),
                       "ferry::flow::make_operation: the name must not be empty");
  }
  auto info = std::make_shared<detail::operation_info>();
  info->name = std::move(name);
  return operation_builder<detail::type_list<>, detail::type_list<>>(std::move(info));
}

// --- results -------------------------------------------------------------------------------

bool results::contains(std::string_view key) const { return values_.find(key) != values_.end(); }

void results::set(std::string key, std::type_index type, detail::value_ptr value) {
  values_.insert_or_assign(std::move(key), entry{type, std::move(value)});
}

const results::entry& results::find(std::string_view key) const {
  auto it = values_.find(key);
  if (it == values_.end()) {
    throw ferry::error(make_error_code(errc::output_missing),
                       "results: no output named '" + std::string(key) + "'");
  }
  return it->second;
}

void results::throw_type(std::string_view key, const std::type_info& asked) const {
  throw ferry::error(make_error_code(errc::type_mismatch),
                     "results: output '" + std::string(key) + "' is not a " + type_name(asked));
}

// --- flows ---------------------------------------------------------------------------------

namespace detail {

struct resolved_source {
  std::string def;
  enum class from { any, seed, instance } kind = from::any;
  std::string instance;
  std::string port;

  bool matches(const input& in) const {
    if (in.definition().name() != def) return false;
    switch (kind) {
      case from::any: return true;
      case from::seed: return in.from().seed();
      case from::instance: return in.from().instance == instance && in.from().output == port;
    }
    return false;
  }
};

struct instance_desc {
  operation op;
  std::vector<std::vector<resolved_source>> sources;  // per input port
};

struct flow_impl {
  std::vector<operation> ops;
  std::vector<output_spec> outputs;
  flow_options options;
  std::vector<instance_desc> instances;
  std::map<std::string, any_definition, std::less<>> definitions;
  // definition name -> (instance, port) pairs one of whose sources reads it
  std::map<std::string, std::vector<std::pair<std::size_t, std::size_t>>, std::less<>> consumers;
  std::map<std::string, std::vector<std::size_t>, std::less<>> condition_users;
  std::vector<any_definition> defaulted;  // read by some port, with a default value
};

namespace {

[[noreturn]] void flow_fail(errc e, const std::string& what) {
  throw ferry::error(make_error_code(e), "ferry::flow::dataflow: " + what);
}

class definition_table {
public:
  explicit definition_table(flow_impl& f) : f_(f) {}

  void add(const any_definition& d, const std::string& where) {
    auto it = f_.definitions.find(d.name());
    if (it == f_.definitions.end()) {
      f_.definitions.emplace(d.name(), d);
      where_.emplace(d.name(), where);
      return;
    }
    if (it->second.type() != d.type()) {
      flow_fail(errc::type_mismatch, "definition '" + d.name() + "' is " +
                                         it->second.type_name() + " in " + where_[d.name()] +
                                         " but " + d.type_name() + " in " + where);
    }
  }

private:
  flow_impl& f_;
  std::map<std::string, std::string> where_;
};

}  // namespace
}  // namespace detail

dataflow::dataflow(std::vector<operation> operations, std::vector<output_spec> outputs,
           flow_options options) {
  using detail::flow_fail;
  auto f = std::make_shared<detail::flow_impl>();
  f->ops = std::move(operations);
  f->outputs = std::move(outputs);
  f->options = std::move(options);
  detail::definition_table defs(*f);

  std::map<std::string, std::size_t, std::less<>> by_instance;
  for (const operation& op : f->ops) {
    if (op.instance().empty()) flow_fail(errc::invalid_name, "an operation instance has no name");
    if (!by_instance.emplace(op.instance(), f->instances.size()).second) {
      flow_fail(errc::duplicate_instance, "two operation instances named '" + op.instance() + "'");
    }
    if (!op.info()->make) {
      flow_fail(errc::not_implemented,
                "operation '" + op.name() + "' (instance '" + op.instance() +
                    "') has no implementation: finish it with implement(...)");
    }
    for (const port& p : op.inputs()) defs.add(p.def, "input '" + p.name + "' of '" + op.instance() + "'");
    for (const port& p : op.outputs()) defs.add(p.def, "output '" + p.name + "' of '" + op.instance() + "'");
    for (const any_definition& c : op.conditions()) defs.add(c, "a condition of '" + op.instance() + "'");
    detail::instance_desc d{op, {}};
    for (const port& p : op.inputs()) {
      detail::resolved_source r;
      r.def = p.def.name();
      d.sources.push_back({std::move(r)});
    }
    f->instances.push_back(std::move(d));
  }
  for (const any_definition& s : f->options.seeds) defs.add(s, "the flow's seeds");

  // Explicit wiring replaces a port's sources.
  std::set<std::pair<std::string, std::string>> wired;
  for (const wiring& w : f->options.wiring) {
    auto it = by_instance.find(w.instance);
    if (it == by_instance.end()) {
      flow_fail(errc::unknown_instance, "wiring names instance '" + w.instance + "', which the flow lacks");
    }
    detail::instance_desc& d = f->instances[it->second];
    const auto& ports = d.op.inputs();
    auto pit = std::find_if(ports.begin(), ports.end(), [&](const port& p) { return p.name == w.port; });
    if (pit == ports.end()) {
      flow_fail(errc::unknown_instance, "wiring names input port '" + w.port + "' of '" + w.instance +
                                            "', which has no such port");
    }
    if (!wired.emplace(w.instance, w.port).second) {
      flow_fail(errc::duplicate_instance, "input port '" + w.port + "' of '" + w.instance + "' is wired twice");
    }
    std::vector<detail::resolved_source> srcs;
    for (const source& s : w.sources) {
      detail::resolved_source r;
      const any_definition* def = nullptr;
      if (s.instance && !s.instance->empty()) {
        auto sit = by_instance.find(*s.instance);
        if (sit == by_instance.end()) {
          flow_fail(errc::unknown_instance, "port '" + w.port + "' of '" + w.instance +
                                                "' is wired from instance '" + *s.instance +
                                                "', which the flow lacks");
        }
        const auto& outs = f->instances[sit->second].op.outputs();
        auto oit = std::find_if(outs.begin(), outs.end(), [&](const port& p) { return p.name == s.definition; });
        if (oit == outs.end()) {
          flow_fail(errc::unknown_instance, "port '" + w.port + "' of '" + w.instance +
                                                "' is wired from output '" + s.definition + "' of '" +
                                                *s.instance + "', which has no such output");
        }
        def = &oit->def;
        r.kind = detail::resolved_source::from::instance;
        r.instance = *s.instance;
        r.port = s.definition;
      } else {
        auto dit = f->definitions.find(s.definition);
        if (dit == f->definitions.end()) {
          flow_fail(errc::unknown_definition, "port '" + w.port + "' of '" + w.instance +
                                                  "' is wired from definition '" + s.definition +
                                                  "', which no operation or seed of the flow carries");
        }
        def = &dit->second;
        r.kind = s.instance ? detail::resolved_source::from::seed : detail::resolved_source::from::any;
      }
      if (def->type() != pit->def.type()) {
        flow_fail(errc::type_mismatch, "port '" + w.port + "' of '" + w.instance + "' takes " +
                                           pit->def.type_name() + " but its source '" + def->name() +
                                           "' carries " + def->type_name());
      }
      r.def = def->name();
      srcs.push_back(std::move(r));
    }
    if (srcs.empty()) {
      flow_fail(errc::unknown_instance, "wiring for port '" + w.port + "' of '" + w.instance + "' has no source");
    }
    d.sources[static_cast<std::size_t>(pit - ports.begin())] = std::move(srcs);
  }

  // What can fill each port; consumers and condition users.
  std::set<std::string> produced;
  for (const detail::instance_desc& d : f->instances) {
    for (const port& p : d.op.outputs()) produced.insert(p.def.name());
  }
  std::set<std::string> seeded;
  for (const any_definition& s : f->options.seeds) seeded.insert(s.name());
  std::set<std::string> defaulted;
  for (std::size_t i = 0; i < f->instances.size(); ++i) {
    const detail::instance_desc& d = f->instances[i];
    for (std::size_t p = 0; p < d.sources.size(); ++p) {
      bool fillable = false;
      for (const detail::resolved_source& s : d.sources[p]) {
        f->consumers[s.def].emplace_back(i, p);
        const any_definition& def = f->definitions.at(s.def);
        const bool can_seed = s.kind != detail::resolved_source::from::instance &&
                              (seeded.count(s.def) != 0 || def.has_default());
        const bool can_produce = s.kind != detail::resolved_source::from::seed && produced.count(s.def) != 0;
        fillable = fillable || can_seed || can_produce;
        if (def.has_default() && defaulted.insert(s.def).second) f->defaulted.push_back(def);
      }
      if (f->options.strict && !fillable) {
        const port& pt = d.op.inputs()[p];
        flow_fail(errc::unfilled_input,
                  "input '" + pt.name + "' of '" + d.op.instance() + "' (definition '" +
                      pt.def.name() + "'): no operation outputs it, it is not among the seeds "
                      "and it has no default value");
      }
    }
    for (const any_definition& c : d.op.conditions()) f->condition_users[c.name()].push_back(i);
  }

  std::set<std::string> keys;
  for (const output_spec& o : f->outputs) {
    for (const any_definition& d : o.definitions()) {
      auto it = f->definitions.find(d.name());
      if (it == f->definitions.end()) {
        flow_fail(errc::unknown_definition, o.kind() + " names definition '" + d.name() +
                                                "', which no operation or seed of the flow carries");
      }
      if (it->second.type() != d.type()) {
        flow_fail(errc::type_mismatch, o.kind() + " reads '" + d.name() + "' as " + d.type_name() +
                                           " but the flow carries " + it->second.type_name());
      }
    }
    if (!keys.insert(o.key()).second) {
      flow_fail(errc::duplicate_output, "two output specs write results['" + o.key() + "']");
    }
  }
  impl_ = std::move(f);
}

const std::vector<operation>& dataflow::operations() const noexcept { return impl_->ops; }
const std::vector<output_spec>& dataflow::outputs() const noexcept { return impl_->outputs; }

// --- the orchestrator's machinery ----------------------------------------------------------

namespace detail {
namespace {

using asio::experimental::as_tuple;
using asio::use_awaitable;


}  // namespace


asio::awaitable<void> ready() { co_return; }

asio::awaitable<std::vector<produced>> run_blocking(thread_pool* pool,
                                                    std::function<std::vector<produced>()> job) {
  auto fn = pool ? ferry::threaded(*pool, std::move(job)) : ferry::threaded(std::move(job));
  auto aw = fn();
  co_return co_await std::move(aw);
}

asio::awaitable<std::vector<produced>> run_spawned(spawn_fn start) {
  // The waiter handles cancellation itself: it must not return before the coroutine it
  // started has ended, since that coroutine may still use the run's inputs.
  co_await asio::this_coro::throw_if_cancelled(false);
  asio::any_io_executor ex = co_await asio::this_coro::executor;
  struct state {
    explicit state(const asio::any_io_executor& e) : done_signal(e) {}
    loop_event done_signal;
    bool done = false;
    std::exception_ptr error;
    std::vector<produced> out;
    asio::cancellation_signal cancel;
  };
  auto st = std::make_shared<state>(ex);
  start(ex, st->cancel.slot(), [st](std::exception_ptr e, std::vector<produced> out) {
    st->error = std::move(e);
    st->out = std::move(out);
    st->done = true;
    st->done_signal.notify();
  });
  bool forwarded = false;
  while (!st->done) {
    auto w = st->done_signal.wait();
    co_await std::move(w);
    if (!forwarded) {
      auto c = cancelled_now();
      if (co_await std::move(c)) {
        forwarded = true;
        st->cancel.emit(asio::cancellation_type::terminal);
      }
    }
  }
  if (st->error) std::rethrow_exception(st->error);
  co_return std::move(st->out);
}


struct flow_runtime {
  std::shared_ptr<const flow_impl> flow;
  std::vector<std::unique_ptr<implementation_base>> impls;  // one per instance
  enum class phase { idle, entering, ready, failed } state = phase::idle;
  std::exception_ptr enter_error;
};

struct context_state;

struct stream_state {
  explicit stream_state(const asio::any_io_executor& executor) : ex(executor), ready_signal(executor) {}
  asio::any_io_executor ex;
  loop_event ready_signal;
  std::deque<context_result> ready;
  std::size_t pending = 0;
  std::vector<std::shared_ptr<asio::cancellation_signal>> cancels;
};

struct orchestrator_impl : std::enable_shared_from_this<orchestrator_impl> {
  orchestrator_impl(flow::context s, orchestrator_options o)
      : scope(std::move(s)), options(std::move(o)), ex(scope.get_executor()),
        slot_signal(ex), live_signal(ex) {}

  flow::context scope;
  orchestrator_options options;
  asio::any_io_executor ex;
  std::map<const flow_impl*, std::shared_ptr<flow_runtime>> flows;
  std::vector<implementation_base*> entered;  // in the order they entered
  loop_event slot_signal;                         // a context slot freed, or a flow entered
  loop_event live_signal;                         // a context ended
  std::size_t running = 0;                    // contexts holding a slot
  std::map<std::uint64_t, std::shared_ptr<asio::cancellation_signal>> live;
  bool closing = false;
  bool closed = false;

  void report(const operation_error& e) {
    if (options.on_error) {
      try {
        options.on_error(e);
      } catch (...) {
        std::cerr << "ferry::flow: on_error threw; the report was: " << e.what() << '\n';
      }
    } else {
      std::cerr << "ferry::flow: " << e.what() << '\n';
    }
  }

  asio::awaitable<std::exception_ptr> ensure_entered(std::shared_ptr<flow_runtime> rt);
};

struct context_state : std::enable_shared_from_this<context_state> {
  context_state(std::shared_ptr<orchestrator_impl> o, std::shared_ptr<flow_runtime> r,
                run_context_id i, std::string n)
      : orch(std::move(o)), rt(std::move(r)), f(*rt->flow), id(i), name(std::move(n)),
        idle(orch->ex), lock_signal(orch->ex), done(f.instances.size()) {}

  std::shared_ptr<orchestrator_impl> orch;
  std::shared_ptr<flow_runtime> rt;
  const flow_impl& f;
  run_context_id id;
  std::string name;
  loop_event idle;         // active fell to 0
  loop_event lock_signal;  // a lock was released
  std::map<std::string, std::vector<input_ptr>, std::less<>> by_def;
  std::vector<input_ptr> all;
  std::vector<std::set<std::vector<std::uint64_t>>> done;  // per instance: combinations run
  std::set<std::uint64_t> held_locks;
  std::map<std::uint64_t, std::shared_ptr<asio::cancellation_signal>> runs;
  std::uint64_t next_run = 0;
  std::size_t active = 0;
  stage current = stage::processing;
  bool stopping = false;
  std::exception_ptr failure;
  std::vector<std::exception_ptr> errors;

  const std::vector<input_ptr>& values(std::string_view def) const {
    static const std::vector<input_ptr> none;
    auto it = by_def.find(def);
    return it == by_def.end() ? none : it->second;
  }

  // Cancels every run; the context ends once they have.
  void stop(std::exception_ptr why) {
    if (!failure) failure = std::move(why);
    if (stopping) return;
    stopping = true;
    auto copy = runs;
    for (auto& [rid, sig] : copy) sig->emit(asio::cancellation_type::terminal);
  }

  // New inputs in the network: schedule what they make runnable.
  void add_inputs(const std::vector<input_ptr>& fresh) {
    for (const input_ptr& in : fresh) {
      by_def[in->definition().name()].push_back(in);
      all.push_back(in);
    }
    for (const input_ptr& in : fresh) {
      if (stopping) return;
      auto cit = f.consumers.find(in->definition().name());
      if (cit != f.consumers.end()) {
        for (auto [inst, port] : cit->second) {
          if (f.instances[inst].op.stage() != current) continue;
          bool match = false;
          for (const resolved_source& s : f.instances[inst].sources[port]) match = match || s.matches(*in);
          if (match) enumerate(inst, port, in);
        }
      }
      auto uit = f.condition_users.find(in->definition().name());
      if (uit != f.condition_users.end()) {
        for (std::size_t inst : uit->second) {
          if (f.instances[inst].op.stage() == current) enumerate(inst, SIZE_MAX, nullptr);
        }
      }
    }
  }

  std::vector<input_ptr> candidates(std::size_t inst, std::size_t port) const {
    std::vector<input_ptr> out;
    for (const resolved_source& s : f.instances[inst].sources[port]) {
      for (const input_ptr& in : values(s.def)) {
        if (s.matches(*in) &&
            std::none_of(out.begin(), out.end(), [&](const input_ptr& o) { return o == in; })) {
          out.push_back(in);
        }
      }
    }
    return out;
  }

  // Every combination of candidates (with `fixed` on port `fixed_port`, when given).
  void enumerate(std::size_t inst, std::size_t fixed_port, const input_ptr& fixed) {
    if (stopping || !conditions_hold(inst)) return;  // nothing could be scheduled
    const std::size_t n = f.instances[inst].sources.size();
    std::vector<std::vector<input_ptr>> cands(n);
    for (std::size_t p = 0; p < n; ++p) {
      if (p == fixed_port) {
        cands[p] = {fixed};
      } else {
        cands[p] = candidates(inst, p);
      }
      if (cands[p].empty()) return;
    }
    std::vector<std::size_t> at(n, 0);
    for (;;) {
      if (stopping) return;
      std::vector<input_ptr> combo(n);
      for (std::size_t p = 0; p < n; ++p) combo[p] = cands[p][at[p]];
      try_schedule(inst, std::move(combo));
      std::size_t p = 0;
      while (p < n && ++at[p] == cands[p].size()) at[p++] = 0;
      if (p == n) return;
    }
  }

  bool conditions_hold(std::size_t inst) const {
    for (const any_definition& c : f.instances[inst].op.conditions()) {
      const auto& v = values(c.name());
      if (v.empty() || !v.back()->value<bool>()) return false;
    }
    return true;
  }

  void try_schedule(std::size_t inst, std::vector<input_ptr> combo) {
    if (stopping || !conditions_hold(inst)) return;
    std::vector<std::uint64_t> key;
    key.reserve(combo.size());
    for (const input_ptr& in : combo) key.push_back(in->id());
    std::sort(key.begin(), key.end());
    if (!done[inst].insert(std::move(key)).second) return;
    start_run(inst, std::move(combo));
  }

  void schedule_stage(stage s) {
    current = s;
    for (std::size_t i = 0; i < f.instances.size(); ++i) {
      if (f.instances[i].op.stage() != s) continue;
      if (f.instances[i].sources.empty()) {
        try_schedule(i, {});
      } else {
        enumerate(i, SIZE_MAX, nullptr);
      }
    }
  }

  void start_run(std::size_t inst, std::vector<input_ptr> combo);
  asio::awaitable<void> run_op(std::size_t inst, std::vector<input_ptr> combo);
  asio::awaitable<void> wait_idle(bool& cancelled);
  std::exception_ptr admit(const input_ptr& in) const;
};

void context_state::start_run(std::size_t inst, std::vector<input_ptr> combo) {
  ++active;
  const std::uint64_t rid = ++next_run;
  auto sig = std::make_shared<asio::cancellation_signal>();
  runs.emplace(rid, sig);
  auto self = shared_from_this();
  asio::co_spawn(orch->ex, run_op(inst, std::move(combo)),
                 asio::bind_cancellation_slot(sig->slot(), [self, rid](std::exception_ptr e) {
                   if (e) self->stop(e);  // run_op catches everything; defensive
                   self->runs.erase(rid);
                   if (--self->active == 0) self->idle.notify();
                 }));
}

// A value entering the context: its definition's validator must accept it.
std::exception_ptr context_state::admit(const input_ptr& in) const {
  const auto& info = in->definition().info();
  if (info->validator && !info->validator(in->raw())) {
    return std::make_exception_ptr(ferry::error(
        make_error_code(errc::invalid_input),
        "context '" + name + "': the validator of '" + info->name + "' refused a value" +
            (in->from().seed() ? std::string(" (seed)")
                               : " from " + in->from().instance + "." + in->from().output)));
  }
  return nullptr;
}

asio::awaitable<void> context_state::run_op(std::size_t inst, std::vector<input_ptr> combo) {
  co_await asio::this_coro::throw_if_cancelled(false);  // cancellation is handled below
  auto self = shared_from_this();
  const instance_desc& d = f.instances[inst];
  const operation& op = d.op;

  // Locks: every distinct locked input, in ascending id order (one global order).
  std::vector<std::uint64_t> want;
  for (const input_ptr& in : combo) {
    if (in->definition().locked()) want.push_back(in->id());
  }
  std::sort(want.begin(), want.end());
  want.erase(std::unique(want.begin(), want.end()), want.end());
  std::vector<std::uint64_t> got;
  auto release = [&] {
    for (std::uint64_t lock_id : got) held_locks.erase(lock_id);
    if (!got.empty()) lock_signal.notify();
    got.clear();
  };
  try {
    for (std::uint64_t lock_id : want) {
      while (held_locks.count(lock_id) != 0) {
        if (stopping) break;
        auto w = lock_signal.wait();
        co_await std::move(w);
      }
      if (stopping) break;
      held_locks.insert(lock_id);
      got.push_back(lock_id);
    }
  } catch (...) {
    release();
    co_return;  // cancelled while waiting: the context is stopping
  }
  if (stopping) {
    release();
    co_return;
  }

  run_info info;
  info.context = id;
  info.context_name = name;
  info.instance = op.instance();
  info.inputs = combo;
  info.scope = &orch->scope;
  info.pool = orch->options.pool;
  std::weak_ptr<context_state> weak = self;
  info.context_values = [weak](std::string_view def) {
    auto c = weak.lock();
    return c ? c->values(def) : std::vector<input_ptr>{};
  };

  std::vector<produced> out;
  std::exception_ptr err;
  implementation_base& impl = *rt->impls[inst];
  for (unsigned attempt = 1; attempt <= op.retry(); ++attempt) {
    if (stopping) break;
    info.attempt = attempt;
    err = nullptr;
    try {
      auto r = impl.run(info);
      out = co_await std::move(r);
      break;
    } catch (...) {
      err = std::current_exception();
    }
  }
  release();
  if (stopping) co_return;  // cancelled, or another run failed first: nothing to report
  if (err) {
    operation_error oe(op.instance(), name, combo, err);
    if (orch->options.strict) {
      stop(std::make_exception_ptr(std::move(oe)));
    } else {
      errors.push_back(std::make_exception_ptr(oe));
      orch->report(oe);
    }
    co_return;
  }
  std::vector<input_ptr> fresh;
  fresh.reserve(out.size());
  for (produced& p : out) {
    const port& pt = op.outputs()[p.port];
    auto in = std::make_shared<const input>(++next_input_id, pt.def, std::move(p.value),
                                            origin{op.instance(), pt.name}, combo);
    if (std::exception_ptr bad = admit(in)) {
      operation_error oe(op.instance(), name, combo, bad);
      if (orch->options.strict) {
        stop(std::make_exception_ptr(std::move(oe)));
        co_return;
      }
      errors.push_back(std::make_exception_ptr(oe));
      orch->report(oe);
      continue;
    }
    fresh.push_back(std::move(in));
  }
  add_inputs(fresh);
}

// Waits until no run is active. Cancellation of the waiting coroutine stops the context.
asio::awaitable<void> context_state::wait_idle(bool& cancelled) {
  while (active != 0) {
    auto w = idle.wait();
    co_await std::move(w);
    if (!cancelled) {
      auto c = cancelled_now();
      if (co_await std::move(c)) {
        cancelled = true;
        stop(std::make_exception_ptr(ferry::error(
            make_error_code(asio::error::operation_aborted),
            "context '" + name + "': cancelled")));
      }
    }
  }
}

asio::awaitable<std::exception_ptr> orchestrator_impl::ensure_entered(std::shared_ptr<flow_runtime> rt) {
  auto self = shared_from_this();
  for (;;) {
    if (rt->state == flow_runtime::phase::ready) co_return nullptr;
    if (rt->state == flow_runtime::phase::failed) co_return rt->enter_error;
    if (rt->state == flow_runtime::phase::idle) break;
    auto w = slot_signal.wait();  // another context is entering this flow
    co_await std::move(w);
    auto c = cancelled_now();
    if (co_await std::move(c)) {
      co_return std::make_exception_ptr(
          ferry::error(make_error_code(asio::error::operation_aborted), "cancelled while entering"));
    }
  }
  rt->state = flow_runtime::phase::entering;
  std::exception_ptr err;
  for (std::size_t i = 0; i < rt->impls.size(); ++i) {
    try {
      auto e = rt->impls[i]->enter(scope);
      co_await std::move(e);
      entered.push_back(rt->impls[i].get());
    } catch (...) {
      err = std::make_exception_ptr(operation_error(rt->flow->instances[i].op.instance(),
                                                    "(enter)", {}, std::current_exception()));
      break;
    }
  }
  rt->state = err ? flow_runtime::phase::failed : flow_runtime::phase::ready;
  rt->enter_error = err;
  slot_signal.notify();
  co_return err;
}

asio::awaitable<void> run_context(std::shared_ptr<context_state> c, std::vector<input_ptr> seeds) {
  co_await asio::this_coro::throw_if_cancelled(false);
  orchestrator_impl& o = *c->orch;
  bool cancelled = false;
  auto check_cancel = [&]() -> asio::awaitable<bool> {
    if (!cancelled) {
      auto q = cancelled_now();
      if (co_await std::move(q)) {
        cancelled = true;
        c->stop(std::make_exception_ptr(ferry::error(
            make_error_code(asio::error::operation_aborted), "context '" + c->name + "': cancelled")));
      }
    }
    co_return cancelled;
  };

  // O13: wait for a slot.
  while (o.running >= o.options.max_contexts) {
    auto w = o.slot_signal.wait();
    co_await std::move(w);
    auto q = check_cancel();
    if (co_await std::move(q)) co_return;
  }
  ++o.running;
  struct slot_guard {
    orchestrator_impl& o;
    ~slot_guard() {
      --o.running;
      o.slot_signal.notify();
    }
  } guard{o};

  {
    auto e = o.ensure_entered(c->rt);
    if (std::exception_ptr err = co_await std::move(e)) {
      c->stop(err);
      co_return;
    }
  }
  {
    auto q = check_cancel();
    if (co_await std::move(q)) co_return;
  }

  for (const input_ptr& in : seeds) {
    if (std::exception_ptr bad = c->admit(in)) {
      c->stop(bad);
      co_return;
    }
  }
  c->add_inputs(seeds);
  c->schedule_stage(stage::processing);  // O9: instances without inputs start now
  for (;;) {
    auto w = c->wait_idle(cancelled);
    co_await std::move(w);
    if (c->stopping) co_return;
    // Defaults fill definitions that are still empty, which may make more runnable.
    std::vector<input_ptr> defaults;
    for (const any_definition& d : c->f.defaulted) {
      if (c->values(d.name()).empty()) {
        defaults.push_back(std::make_shared<const input>(++next_input_id, d, d.info()->default_value,
                                                         origin{}, std::vector<input_ptr>{}));
      }
    }
    if (defaults.empty()) break;
    c->add_inputs(defaults);
  }
  for (stage s : {stage::cleanup, stage::output}) {
    c->schedule_stage(s);
    auto w = c->wait_idle(cancelled);
    co_await std::move(w);
    if (c->stopping) co_return;
  }
}

context_result finish_context(context_state& c) {
  context_result r;
  r.id = c.id;
  r.name = c.name;
  r.errors = std::move(c.errors);
  r.inputs = std::move(c.all);
  r.error = c.failure;
  if (!r.error) {
    context_view view{c.name, [&c](const std::string& d) -> const std::vector<input_ptr>& {
                        return c.values(d);
                      }};
    for (const output_spec& o : c.f.outputs) {
      try {
        r.results.set(o.key(), o.info()->result_type, o.info()->compute(view));
      } catch (...) {
        r.error = std::current_exception();
        break;
      }
    }
  }
  // Break the cycles through run closures.
  c.by_def.clear();
  c.all.clear();  // moved from; cleared to a known state
  return r;
}

}  // namespace detail

// --- orchestrator --------------------------------------------------------------------------

namespace detail {
asio::awaitable<void> close_orchestrator(std::shared_ptr<orchestrator_impl> impl,
                                         std::exception_ptr why);
asio::awaitable<void> close_if_alive(std::weak_ptr<orchestrator_impl> weak, std::exception_ptr why);
}  // namespace detail

orchestrator::orchestrator(flow::context scope, orchestrator_options options) {
  if (options.max_contexts == 0) {
    throw ferry::error(ferry::errc::invalid_argument,
                       "ferry::flow::orchestrator: max_contexts must be at least 1");
  }
  impl_ = std::make_shared<detail::orchestrator_impl>(std::move(scope), std::move(options));
  // If the scope closes first, it closes the orchestrator (exits its implementations).
  std::weak_ptr<detail::orchestrator_impl> weak = impl_;
  impl_->scope.add_teardown_callback(
      [weak](std::exception_ptr why) { return detail::close_if_alive(weak, std::move(why)); },
      pass_exception);
}

orchestrator::~orchestrator() {
  if (impl_ && !impl_->closed && !impl_->entered.empty()) {
    std::cerr << "ferry::flow::orchestrator destroyed without close(): " << impl_->entered.size()
              << " implementation(s) were entered and never exited\n";
  }
  if (impl_) {
    for (auto& [id, sig] : impl_->live) sig->emit(asio::cancellation_type::terminal);
  }
}

const flow::context& orchestrator::scope() const noexcept { return impl_->scope; }

result_stream orchestrator::stream(const dataflow& f, std::vector<input_set> sets) {
  detail::orchestrator_impl& o = *impl_;
  if (o.closing) {
    throw ferry::error(make_error_code(errc::context_closed),
                       "ferry::flow::orchestrator: run after close()");
  }
  // Check every seed before anything starts: a bad one fails the whole call.
  const detail::flow_impl& fi = *f.impl();
  std::vector<std::vector<input_ptr>> seeds(sets.size());
  for (std::size_t i = 0; i < sets.size(); ++i) {
    for (const seed_value& s : sets[i].seeds) {
      auto it = fi.definitions.find(s.def.name());
      if (it == fi.definitions.end()) {
        throw ferry::error(make_error_code(errc::unknown_definition),
                           "ferry::flow::orchestrator: a seed of '" + s.def.name() +
                               "', which the flow does not know");
      }
      if (it->second.type() != s.def.type()) {
        throw ferry::error(make_error_code(errc::type_mismatch),
                           "ferry::flow::orchestrator: a seed of '" + s.def.name() + "' as " +
                               s.def.type_name() + " where the flow carries " + it->second.type_name());
      }
      if (!s.value) {
        throw ferry::error(make_error_code(errc::null_resource),
                           "ferry::flow::orchestrator: a seed of '" + s.def.name() + "' without a value");
      }
      seeds[i].push_back(std::make_shared<const input>(++detail::next_input_id, it->second, s.value,
                                                       origin{}, std::vector<input_ptr>{}));
    }
  }

  auto& rt = o.flows[&fi];
  if (!rt) {
    rt = std::make_shared<detail::flow_runtime>();
    rt->flow = f.impl();
    for (const detail::instance_desc& d : fi.instances) rt->impls.push_back(d.op.info()->make());
  }
  auto st = std::make_shared<detail::stream_state>(o.ex);
  st->pending = sets.size();
  for (std::size_t i = 0; i < sets.size(); ++i) {
    const run_context_id id{++detail::next_context_id};
    std::string name = sets[i].name.empty() ? "context " + std::to_string(id.value) : sets[i].name;
    auto c = std::make_shared<detail::context_state>(impl_, rt, id, std::move(name));
    auto sig = std::make_shared<asio::cancellation_signal>();
    st->cancels.push_back(sig);
    o.live.emplace(id.value, sig);
    auto op = detail::run_context(c, std::move(seeds[i]));
    asio::co_spawn(o.ex, std::move(op),
                   asio::bind_cancellation_slot(sig->slot(), [c, st, impl = impl_, id](std::exception_ptr e) {
                     if (e && !c->failure) c->failure = e;
                     st->ready.push_back(detail::finish_context(*c));
                     --st->pending;
                     st->ready_signal.notify();
                     impl->live.erase(id.value);
                     impl->live_signal.notify();
                   }));
  }
  return result_stream(std::move(st));
}

asio::awaitable<std::vector<context_result>> orchestrator::run(const dataflow& f, std::vector<input_set> sets) {
  result_stream s = stream(f, std::move(sets));
  std::vector<context_result> out;
  for (;;) {
    auto n = s.next();
    std::optional<context_result> r = co_await std::move(n);
    if (!r) break;
    out.push_back(std::move(*r));
  }
  co_return out;
}

asio::awaitable<results> orchestrator::run_one(const dataflow& f, input_set set) {
  std::vector<input_set> v;
  v.push_back(std::move(set));
  auto op = run(f, std::move(v));
  std::vector<context_result> r = co_await std::move(op);
  r.front().rethrow_if_failed();
  co_return std::move(r.front().results);
}

asio::awaitable<void> orchestrator::close() { return detail::close_orchestrator(impl_, nullptr); }

namespace detail {
asio::awaitable<void> close_orchestrator(std::shared_ptr<orchestrator_impl> impl,
                                         std::exception_ptr why) {
  orchestrator_impl& o = *impl;
  if (o.closing) {
    while (!o.closed) {
      auto w = o.live_signal.wait();
      co_await std::move(w);
    }
    co_return;
  }
  o.closing = true;
  {
    auto copy = o.live;
    for (auto& [id, sig] : copy) sig->emit(asio::cancellation_type::terminal);
  }
  while (!o.live.empty()) {
    auto w = o.live_signal.wait();
    co_await std::move(w);
  }
  std::vector<std::exception_ptr> errors;
  while (!o.entered.empty()) {
    detail::implementation_base* impl_obj = o.entered.back();
    o.entered.pop_back();
    try {
      auto e = impl_obj->exit(why);
      co_await std::move(e);
    } catch (...) {
      errors.push_back(std::current_exception());
    }
  }
  o.flows.clear();
  o.closed = true;
  o.live_signal.notify();
  if (!errors.empty()) throw teardown_error(std::move(errors));
}

asio::awaitable<void> close_if_alive(std::weak_ptr<orchestrator_impl> weak, std::exception_ptr why) {
  if (auto impl = weak.lock()) {
    if (!impl->closing) {
      auto c = close_orchestrator(std::move(impl), std::move(why));
      co_await std::move(c);
    }
  }
}
}  // namespace detail

// --- subflows -----------------------------------------------------------------------------

namespace detail {
namespace {

class subflow_implementation final : public implementation_base {
public:
  subflow_implementation(dataflow child, std::vector<any_definition> forward,
                         std::vector<port> outputs)
      : child_(std::move(child)), forward_(std::move(forward)), outputs_(std::move(outputs)) {}

  asio::awaitable<void> enter(flow::context& scope) override {
    orch_ = std::make_unique<orchestrator>(scope);
    co_return;
  }
  asio::awaitable<void> exit(std::exception_ptr) override {
    if (orch_) {
      auto c = orch_->close();
      co_await std::move(c);
    }
  }
  asio::awaitable<std::vector<produced>> run(const run_info& info) override {
    std::vector<seed_value> seeds;
    for (const input_ptr& in : info.inputs) seeds.push_back({in->definition(), in->shared_value()});
    for (const any_definition& d : forward_) {
      for (const input_ptr& in : info.context_values(d.name())) {
        seeds.push_back({in->definition(), in->shared_value()});
      }
    }
    std::vector<input_set> sets;
    sets.emplace_back(info.context_name + "/" + info.instance, std::move(seeds));
    auto op = orch_->run(child_, std::move(sets));
    std::vector<context_result> r = co_await std::move(op);
    r.front().rethrow_if_failed();
    std::vector<produced> out;
    for (std::size_t k = 0; k < outputs_.size(); ++k) {
      for (const input_ptr& in : r.front().inputs) {
        if (in->definition().name() == outputs_[k].def.name() && !in->from().seed()) {
          out.push_back({k, in->shared_value()});
        }
      }
    }
    co_return out;
  }

private:
  dataflow child_;
  std::vector<any_definition> forward_;
  std::vector<port> outputs_;
  std::unique_ptr<orchestrator> orch_;
};

}  // namespace
}  // namespace detail

operation make_subflow(std::string name, dataflow child, std::vector<any_definition> inputs,
                       std::vector<any_definition> outputs, std::vector<any_definition> forward) {
  if (name.empty()) {
    throw ferry::error(make_error_code(errc::invalid_name), "ferry::flow::make_subflow: empty name");
  }
  const auto& known = child.impl()->definitions;
  auto check = [&](const any_definition& d, const char* role) {
    auto it = known.find(d.name());
    if (it == known.end()) {
      throw ferry::error(make_error_code(errc::unknown_definition),
                         "ferry::flow::make_subflow('" + name + "'): " + role + " '" + d.name() +
                             "' is not a definition of the child flow");
    }
    if (it->second.type() != d.type()) {
      throw ferry::error(make_error_code(errc::type_mismatch),
                         "ferry::flow::make_subflow('" + name + "'): " + role + " '" + d.name() +
                             "' is " + d.type_name() + " but the child flow carries " +
                             it->second.type_name());
    }
  };
  auto info = std::make_shared<detail::operation_info>();
  info->name = name;
  for (const any_definition& d : inputs) {
    check(d, "input");
    info->inputs.push_back({d.name(), d, false});
  }
  for (const any_definition& d : outputs) {
    check(d, "output");
    info->outputs.push_back({d.name(), d, false});
  }
  for (const any_definition& d : forward) check(d, "forwarded definition");
  info->make = [child = std::move(child), forward = std::move(forward),
                outs = info->outputs]() -> std::unique_ptr<detail::implementation_base> {
    return std::make_unique<detail::subflow_implementation>(child, forward, outs);
  };
  return operation(std::move(info), std::move(name));
}

// --- result_stream -------------------------------------------------------------------------

result_stream& result_stream::operator=(result_stream&& other) noexcept {
  if (this != &other) {
    cancel_pending();
    state_ = std::move(other.state_);
  }
  return *this;
}

result_stream::~result_stream() { cancel_pending(); }

void result_stream::cancel_pending() noexcept {
  if (state_ && state_->pending != 0) {
    for (auto& sig : state_->cancels) sig->emit(asio::cancellation_type::terminal);
  }
}

asio::awaitable<std::optional<context_result>> result_stream::next() {
  auto st = state_;
  if (!st) {
    throw ferry::error(ferry::errc::invalid_argument, "result_stream::next: moved-from stream");
  }
  while (st->ready.empty() && st->pending != 0) {
    auto w = st->ready_signal.wait();
    co_await std::move(w);
    auto c = detail::cancelled_now();
    if (co_await std::move(c)) {
      throw ferry::error(make_error_code(asio::error::operation_aborted),
                         "result_stream::next: cancelled");
    }
  }
  if (st->ready.empty()) co_return std::nullopt;
  context_result r = std::move(st->ready.front());
  st->ready.pop_front();
  co_return r;
}

}  // namespace ferry::flow
