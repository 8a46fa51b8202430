// The engine behind ferry/flow/bag.hpp and ferry/flow/bundle.hpp: bags, step mapping, the
// strict construction check, and the coroutines that run seq / par trees.
#include <ferry/flow/bundle.hpp>
#include <ferry/flow/detail/loop_event.hpp>
#include <ferry/threaded.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <array>
#include <map>
#include <memory>
#include <stop_token>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace ferry::flow {

namespace detail {

void throw_invalid_key_name() {
  throw ferry::error(make_error_code(errc::invalid_name), "a flow key needs a non-empty name");
}

void throw_missing_key(std::string_view name) { throw missing_key(std::string(name)); }

void throw_key_type_mismatch(std::string_view name, const std::type_info& stored,
                             const std::type_info& wanted) {
  throw ferry::error(make_error_code(errc::type_mismatch),
                     "key '" + std::string(name) + "' holds a " + type_name(stored) +
                         ", not a " + type_name(wanted));
}

// Where one parameter of a step's function comes from: a bag key, or a bound value.
struct param_source {
  std::string name;                    // the bag key read (after map_input)
  std::shared_ptr<const void> bound;   // non-null: bind()'s value, the bag is not read
  bool mapped = false;
};

struct step_impl {
  std::string name;
  std::shared_ptr<const step_body> body;
  std::vector<param_source> sources;   // one per body->params
  std::vector<std::string> out_names;  // one per body->gives (after map_output)
  thread_pool* pool = nullptr;
};

struct node_impl {
  enum class kind { step, seq, par };
  kind k = kind::step;
  std::shared_ptr<const step_impl> step;
  std::vector<std::shared_ptr<const node_impl>> children;
  std::string label;
};

}  // namespace detail

// --- bag ------------------------------------------------------------------------------------

void bag::put(detail::bag_slot s) {
  for (auto& existing : slots_) {
    if (existing.name == s.name) {
      existing = std::move(s);
      return;
    }
  }
  slots_.push_back(std::move(s));
}

bool bag::erase(std::string_view name) noexcept {
  for (auto it = slots_.begin(); it != slots_.end(); ++it) {
    if (it->name == name) {
      slots_.erase(it);
      return true;
    }
  }
  return false;
}

std::vector<std::string> bag::names() const {
  std::vector<std::string> out;
  out.reserve(slots_.size());
  for (const auto& s : slots_) out.push_back(s.name);
  return out;
}

namespace {
bool same_value(const detail::bag_slot& a, const detail::bag_slot& b) noexcept {
  if (a.value == b.value) return true;
  if (a.ops->type != b.ops->type || a.ops->equal == nullptr) return false;
  return a.ops->equal(a.value.get(), b.value.get());
}
}  // namespace

bool operator==(const bag& a, const bag& b) noexcept {
  if (a.size() != b.size()) return false;
  for (const auto& s : a.slots_) {
    const detail::bag_slot* o = b.slot(s.name);
    if (o == nullptr || !same_value(s, *o)) return false;
  }
  return true;
}

// --- step -----------------------------------------------------------------------------------

namespace {
[[noreturn]] void throw_mapping(const std::string& what) {
  throw ferry::error(make_error_code(errc::invalid_mapping), what);
}

std::size_t param_index(const detail::step_impl& s, const std::string& param,
                        const std::string& action) {
  for (std::size_t i = 0; i < s.body->params.size(); ++i) {
    if (s.body->params[i].name == param) return i;
  }
  throw_mapping("step '" + s.name + "' has no parameter '" + param + "' (" + action + ")");
}

void check_type(const detail::step_impl& s, const std::string& key, const std::type_info& have,
                const std::type_info& want) {
  if (have != want) {
    throw ferry::error(make_error_code(errc::type_mismatch),
                       "step '" + s.name + "': key '" + key + "' is a " + type_name(have) +
                           ", not a " + type_name(want));
  }
}
}  // namespace

step::step(std::string name, std::shared_ptr<const detail::step_body> body) {
  if (name.empty()) {
    throw ferry::error(make_error_code(errc::invalid_name), "a flow step needs a non-empty name");
  }
  auto impl = std::make_shared<detail::step_impl>();
  impl->name = std::move(name);
  for (const auto& p : body->params) impl->sources.push_back({p.name, nullptr, false});
  for (const auto& g : body->gives) impl->out_names.push_back(g.name);
  for (std::size_t i = 0; i < body->gives.size(); ++i) {
    for (std::size_t j = 0; j < i; ++j) {
      if (body->gives[i].name == body->gives[j].name) {
        throw_mapping("step '" + impl->name + "' gives key '" + body->gives[i].name + "' twice");
      }
    }
  }
  impl->body = std::move(body);
  impl_ = std::move(impl);
}

const std::string& step::name() const noexcept { return impl_->name; }
bool step::is_coroutine() const noexcept { return impl_->body->coroutine; }

std::vector<key_spec> step::needs() const {
  std::vector<key_spec> out;
  for (std::size_t i = 0; i < impl_->sources.size(); ++i) {
    if (impl_->sources[i].bound) continue;
    key_spec k;
    k.name = impl_->sources[i].name;
    k.type = impl_->body->params[i].type;
    out.push_back(std::move(k));
  }
  return out;
}

std::vector<key_spec> step::gives() const {
  std::vector<key_spec> out;
  for (std::size_t i = 0; i < impl_->out_names.size(); ++i) {
    key_spec k;
    k.name = impl_->out_names[i];
    k.type = impl_->body->gives[i].type;
    out.push_back(std::move(k));
  }
  return out;
}

step step::on(thread_pool& pool) const {
  auto copy = std::make_shared<detail::step_impl>(*impl_);
  copy->pool = &pool;
  return step(std::move(copy));
}

step step::renamed(std::string name) const {
  if (name.empty()) {
    throw ferry::error(make_error_code(errc::invalid_name), "a flow step needs a non-empty name");
  }
  auto copy = std::make_shared<detail::step_impl>(*impl_);
  copy->name = std::move(name);
  return step(std::move(copy));
}

step step::map_input_named(const std::string& param, const std::string& from,
                           const std::type_info& type) const {
  const std::size_t i = param_index(*impl_, param, "mapping it from key '" + from + "'");
  check_type(*impl_, param, *impl_->body->params[i].type, type);
  if (impl_->sources[i].bound) {
    throw_mapping("parameter '" + param + "' of step '" + impl_->name +
                  "' is bound; it cannot also be read from key '" + from + "'");
  }
  auto copy = std::make_shared<detail::step_impl>(*impl_);
  copy->sources[i].name = from;
  copy->sources[i].mapped = true;
  return step(std::move(copy));
}

step step::map_output_named(const std::string& given, const std::string& to,
                            const std::type_info& type) const {
  std::size_t j = impl_->body->gives.size();
  for (std::size_t k = 0; k < impl_->body->gives.size(); ++k) {
    if (impl_->body->gives[k].name == given) j = k;
  }
  if (j == impl_->body->gives.size()) {
    throw_mapping("step '" + impl_->name + "' gives no key '" + given + "' (mapping it to '" +
                  to + "')");
  }
  check_type(*impl_, given, *impl_->body->gives[j].type, type);
  for (std::size_t k = 0; k < impl_->out_names.size(); ++k) {
    if (k != j && impl_->out_names[k] == to) {
      throw_mapping("step '" + impl_->name + "' would give key '" + to + "' twice");
    }
  }
  auto copy = std::make_shared<detail::step_impl>(*impl_);
  copy->out_names[j] = to;
  return step(std::move(copy));
}

step step::bind_named(const std::string& param, std::shared_ptr<const void> value,
                      const detail::value_ops* ops) const {
  const std::size_t i = param_index(*impl_, param, "binding it");
  check_type(*impl_, param, *impl_->body->params[i].type, ops->type);
  if (impl_->sources[i].mapped) {
    throw_mapping("parameter '" + param + "' of step '" + impl_->name +
                  "' is mapped from key '" + impl_->sources[i].name + "'; it cannot also be bound");
  }
  auto copy = std::make_shared<detail::step_impl>(*impl_);
  copy->sources[i].bound = std::move(value);
  return step(std::move(copy));
}

// --- nodes ----------------------------------------------------------------------------------

node::node(const step& s) {
  auto n = std::make_shared<detail::node_impl>();
  n->k = detail::node_impl::kind::step;
  n->step = s.impl();
  n->label = s.name();
  impl_ = std::move(n);
}

std::string node::describe() const { return impl_->label; }

namespace {
node compose(detail::node_impl::kind k, const char* what, std::vector<node> elements) {
  if (elements.empty()) {
    throw ferry::error(ferry::errc::invalid_argument,
                       std::string("flow::") + what + "() needs at least one element");
  }
  auto n = std::make_shared<detail::node_impl>();
  n->k = k;
  n->label = std::string(what) + "(";
  for (std::size_t i = 0; i < elements.size(); ++i) {
    if (i != 0) n->label += ", ";
    n->label += elements[i].impl()->label;
    n->children.push_back(elements[i].impl());
  }
  n->label += ")";
  return node(std::move(n));
}
}  // namespace

node seq(std::vector<node> elements) {
  return compose(detail::node_impl::kind::seq, "seq", std::move(elements));
}
node par(std::vector<node> branches) {
  return compose(detail::node_impl::kind::par, "par", std::move(branches));
}

// --- the strict construction check ----------------------------------------------------------
//
// Key availability is tracked as two sets: P, the keys that may be in the bag at a point, and
// D, the keys that surely are. A step needing a key outside P can never run (errc::never_runs).
// Everything else is approximated on the safe side: a step is only rejected when no run of
// the flow could reach it with its keys.

namespace {
using key_types = std::map<std::string, const std::type_info*, std::less<>>;

struct availability {
  key_types possible;
  key_types sure;
};

void add_all(key_types& to, const key_types& from) {
  for (const auto& [k, t] : from) to[k] = t;
}

key_types intersect(const key_types& a, const key_types& b) {
  key_types out;
  for (const auto& [k, t] : a) {
    auto it = b.find(k);
    if (it != b.end() && *it->second == *t) out.emplace(k, t);
  }
  return out;
}

class strict_checker {
public:
  strict_checker(visibility mode, const std::vector<key_spec>& inputs) : mode_(mode) {
    for (const auto& k : inputs) initial_[k.name] = k.type;
  }

  void run(const detail::node_impl& root) {
    availability a{initial_, initial_};
    check(root, a);
  }

private:
  // Whether node n surely starts with `a` (its first step's keys all surely present).
  bool surely_starts(const detail::node_impl& n, const availability& a) const {
    switch (n.k) {
      case detail::node_impl::kind::step:
        for (const auto& src : n.step->sources) {
          if (!src.bound && a.sure.find(src.name) == a.sure.end()) return false;
        }
        return true;
      case detail::node_impl::kind::seq: return surely_starts(*n.children.front(), a);
      case detail::node_impl::kind::par:
        return std::any_of(n.children.begin(), n.children.end(),
                           [&](const auto& c) { return surely_starts(*c, a); });
    }
    return false;
  }

  void check(const detail::node_impl& n, availability& a) {
    switch (n.k) {
      case detail::node_impl::kind::step: check_step(*n.step, a); return;
      case detail::node_impl::kind::seq:
        for (const auto& c : n.children) check(*c, a);
        return;
      case detail::node_impl::kind::par: {
        availability out{a.possible, {}};
        if (mode_ == visibility::all) out.sure = a.sure;
        if (mode_ == visibility::initial) out.sure = initial_;
        for (const auto& c : n.children) {
          availability b = a;
          const bool sure = surely_starts(*c, a);
          check(*c, b);
          add_all(out.possible, b.possible);
          if (sure) add_all(out.sure, b.sure);
        }
        a = std::move(out);
        return;
      }
    }
  }

  void check_step(const detail::step_impl& s, availability& a) {
    bool surely = true;
    for (std::size_t i = 0; i < s.sources.size(); ++i) {
      const auto& src = s.sources[i];
      if (src.bound) continue;
      auto it = a.possible.find(src.name);
      if (it == a.possible.end()) {
        throw ferry::error(make_error_code(errc::never_runs),
                           "step '" + s.name + "' can never run: it needs key '" + src.name +
                               "', which neither the flow's inputs nor a step before it gives");
      }
      if (*it->second != *s.body->params[i].type) {
        throw ferry::error(make_error_code(errc::type_mismatch),
                           "step '" + s.name + "' needs key '" + src.name + "' as a " +
                               type_name(*s.body->params[i].type) + ", but it is given as a " +
                               type_name(*it->second));
      }
      if (a.sure.find(src.name) == a.sure.end()) surely = false;
    }
    key_types given, given_surely;
    for (std::size_t j = 0; j < s.out_names.size(); ++j) given[s.out_names[j]] = s.body->gives[j].type;
    if (!s.body->partial) given_surely = given;

    switch (mode_) {
      case visibility::all:
        add_all(a.possible, given);
        if (surely) add_all(a.sure, given_surely);
        break;
      case visibility::initial: {
        key_types after = initial_;
        add_all(after, given);
        key_types after_sure = initial_;
        add_all(after_sure, given_surely);
        if (surely) {
          a.possible = std::move(after);
          a.sure = std::move(after_sure);
        } else {
          add_all(a.possible, after);
          a.sure = intersect(a.sure, after_sure);
        }
        break;
      }
      case visibility::none:
        if (surely) {
          a.possible = std::move(given);
          a.sure = std::move(given_surely);
        } else {
          add_all(a.possible, given);
          a.sure = intersect(a.sure, given_surely);
        }
        break;
    }
  }

  visibility mode_;
  key_types initial_;
};
}  // namespace

// --- running --------------------------------------------------------------------------------

namespace {
using asio::experimental::as_tuple;

struct call_state {
  visibility mode;
  bool strict;
  const bag* initial;
  asio::any_io_executor ex;
};

struct node_result {
  bag out;
  bool ran = false;
};

// Whether step s can run on `visible`: every parameter read from the bag is there. A key
// present with another type is an error, not a skip: it is a wiring mistake.
bool step_ready(const detail::step_impl& s, const bag& visible) {
  for (std::size_t i = 0; i < s.sources.size(); ++i) {
    const auto& src = s.sources[i];
    if (src.bound) continue;
    const detail::bag_slot* slot = visible.slot(src.name);
    if (slot == nullptr) return false;
    if (slot->ops->type != *s.body->params[i].type) {
      throw ferry::error(make_error_code(errc::type_mismatch),
                         "step '" + s.name + "' needs key '" + src.name + "' as a " +
                             type_name(*s.body->params[i].type) + ", but the bag holds a " +
                             type_name(slot->ops->type));
    }
  }
  return true;
}

bool can_start(const detail::node_impl& n, const bag& visible) {
  switch (n.k) {
    case detail::node_impl::kind::step: return step_ready(*n.step, visible);
    case detail::node_impl::kind::seq: return can_start(*n.children.front(), visible);
    case detail::node_impl::kind::par:
      for (const auto& c : n.children) {
        if (can_start(*c, visible)) return true;
      }
      return false;
  }
  return false;
}

// Names the function's results after the step's (mapped) keys.
bag name_outputs(const detail::step_impl& s, detail::step_output& out) {
  bag b;
  b.reserve(s.out_names.size());
  const auto& gives = s.body->gives;
  if (out.dynamic) {
    for (const auto& slot : out.dynamic->slots()) {
      std::size_t j = gives.size();
      for (std::size_t k = 0; k < gives.size(); ++k) {
        if (gives[k].name == slot.name) j = k;
      }
      if (j == gives.size()) {
        throw ferry::error(make_error_code(errc::undeclared_output),
                           "step '" + s.name + "' returned key '" + slot.name +
                               "', which it does not declare in gives(...)");
      }
      check_type(s, slot.name, slot.ops->type, *gives[j].type);
      b.put(s.out_names[j], slot.value, slot.ops, s.name.c_str());
    }
    return b;
  }
  for (std::size_t j = 0; j < out.values.size(); ++j) {
    if (out.values[j]) b.put(s.out_names[j], std::move(out.values[j]), s.body->give_ops[j], s.name.c_str());
  }
  return b;
}

asio::awaitable<bag> run_step(const detail::step_impl& s, const bag& visible) {
  constexpr std::size_t inline_args = 12;
  std::array<const void*, inline_args> small{};
  std::vector<const void*> large;
  const void** args = small.data();
  if (s.sources.size() > inline_args) {
    large.resize(s.sources.size());
    args = large.data();
  }
  for (std::size_t i = 0; i < s.sources.size(); ++i) {
    const auto& src = s.sources[i];
    args[i] = src.bound ? src.bound.get() : visible.slot(src.name)->value.get();
  }
  detail::step_output out;
  out.values.resize(s.body->gives.size());
  const detail::step_body& body = *s.body;
  if (body.coroutine) {
    auto aw = body.call_async(args, out);
    co_await std::move(aw);
  } else {
    auto job = [&body, args, &out](std::stop_token stop) { body.call(args, std::move(stop), out); };
    if (s.pool != nullptr) {
      auto fn = ferry::threaded(*s.pool, job);
      auto aw = fn();
      co_await std::move(aw);
    } else {
      auto fn = ferry::threaded(job);
      auto aw = fn();
      co_await std::move(aw);
    }
  }
  co_return name_outputs(s, out);
}

// The bag visible after a node that ran and gave `out`.
void advance(bag& visible, const bag& out, const call_state& cs) {
  switch (cs.mode) {
    case visibility::none: visible = out; return;
    case visibility::initial:
      visible = *cs.initial;
      for (const auto& s : out.slots()) visible.put(s);
      return;
    case visibility::all:
      for (const auto& s : out.slots()) visible.put(s);
      return;
  }
}

asio::awaitable<node_result> run_node(const detail::node_impl& n, const call_state& cs,
                                      const bag& visible);

asio::awaitable<node_result> run_seq(const detail::node_impl& n, const call_state& cs,
                                     const bag& visible) {
  // `current` is the bag the next element sees. Under `none` it is the last outputs
  // themselves, so it is moved, not copied; under `all` the seq's outputs are worked out
  // once at the end, as what differs from `visible`.
  bag current = visible;
  node_result acc;
  for (const auto& child : n.children) {
    node_result r;
    if (child->k == detail::node_impl::kind::step) {  // the common case, one frame less
      if (!step_ready(*child->step, current)) continue;
      auto op = run_step(*child->step, current);
      r.out = co_await std::move(op);
      r.ran = true;
    } else {
      auto op = run_node(*child, cs, current);
      r = co_await std::move(op);
      if (!r.ran) continue;
    }
    acc.ran = true;
    switch (cs.mode) {
      case visibility::none: current = std::move(r.out); break;
      case visibility::initial:
        current = *cs.initial;
        for (const auto& s : r.out.slots()) current.put(s);
        acc.out = std::move(r.out);
        break;
      case visibility::all:
        for (const auto& s : r.out.slots()) current.put(s);
        break;
    }
  }
  if (!acc.ran) co_return acc;
  if (cs.mode == visibility::none) {
    acc.out = std::move(current);
  } else if (cs.mode == visibility::all) {
    for (const auto& s : current.slots()) {
      const detail::bag_slot* before = visible.slot(s.name);
      if (before == nullptr || before->value != s.value) acc.out.put(s);
    }
  }
  co_return acc;
}

// The branches of one par call. Branch coroutines and the waiter all run on the call's
// executor (one handler at a time), so plain fields are enough.
struct join_state {
  join_state(const asio::any_io_executor& ex, std::size_t n)
      : wake(ex),
        results(n),
        signals(std::make_unique<asio::cancellation_signal[]>(n)),
        count(n),
        remaining(n) {}
  flow::detail::loop_event wake;
  std::vector<node_result> results;
  std::unique_ptr<asio::cancellation_signal[]> signals;
  std::size_t count;
  std::size_t remaining;
  std::exception_ptr first_error;

  void cancel_all_but(std::size_t skip) {
    for (std::size_t j = 0; j < count; ++j) {
      if (j != skip) signals[j].emit(asio::cancellation_type::terminal);
    }
  }
};

node_result merge_branches(std::vector<node_result>& results) {
  node_result merged;
  merged.ran = true;
  for (auto& r : results) {
    for (const auto& s : r.out.slots()) {
      const detail::bag_slot* prev = merged.out.slot(s.name);
      if (prev == nullptr) {
        merged.out.put(s);
      } else if (!same_value(*prev, s)) {
        throw merge_conflict(s.name, prev->producer, s.producer);
      }
    }
  }
  return merged;
}

asio::awaitable<node_result> run_par(const detail::node_impl& n, const call_state& cs,
                                     const bag& visible) {
  std::vector<const detail::node_impl*> started;
  for (const auto& c : n.children) {
    if (can_start(*c, visible)) started.push_back(c.get());
  }
  if (started.empty()) {
    if (cs.strict) {
      throw ferry::error(make_error_code(errc::no_branch_ran),
                         "no branch of " + n.label + " can start: the first step of each lacks a key");
    }
    co_return node_result{};
  }
  if (started.size() == 1) {
    auto op = run_node(*started.front(), cs, visible);
    co_return co_await std::move(op);
  }

  auto st = std::make_shared<join_state>(cs.ex, started.size());
  // The branches read `visible` and the step tree: this frame must not end before they do,
  // whatever happens to it. So the wait handles cancellation itself and forwards it.
  const bool throwing = co_await asio::this_coro::throw_if_cancelled();
  co_await asio::this_coro::throw_if_cancelled(false);
  std::exception_ptr spawn_failure;
  std::size_t spawned = 0;
  try {
    for (; spawned < started.size(); ++spawned) {
      const std::size_t i = spawned;
      asio::co_spawn(cs.ex, run_node(*started[i], cs, visible),
                     asio::bind_cancellation_slot(
                         st->signals[i].slot(), [st, i](std::exception_ptr e, node_result r) {
                           if (e) {
                             if (!st->first_error) {
                               st->first_error = e;
                               st->cancel_all_but(i);
                             }
                           } else {
                             st->results[i] = std::move(r);
                           }
                           if (--st->remaining == 0) st->wake.notify();
                         }));
    }
  } catch (...) {
    // Could not start them all (allocation): stop the ones started, wait for them below.
    spawn_failure = std::current_exception();
    st->remaining -= started.size() - spawned;
    st->cancel_all_but(st->count);
  }
  bool forwarded = false;
  while (st->remaining != 0) {
    if (!forwarded) {
      // A cancellation that came before this wait (or while the branches were starting)
      // does not wake it: look at the state on every round, including the first.
      asio::cancellation_state cstate = co_await asio::this_coro::cancellation_state;
      if (cstate.cancelled() != asio::cancellation_type::none) {
        forwarded = true;
        st->cancel_all_but(st->count);
      }
    }
    auto wait = st->wake.wait();
    co_await std::move(wait);
  }
  if (spawn_failure) {
    co_await asio::this_coro::throw_if_cancelled(throwing);
    std::rethrow_exception(spawn_failure);
  }
  co_await asio::this_coro::throw_if_cancelled(throwing);
  if (st->first_error) std::rethrow_exception(st->first_error);
  co_return merge_branches(st->results);
}

asio::awaitable<node_result> run_node(const detail::node_impl& n, const call_state& cs,
                                      const bag& visible) {
  switch (n.k) {
    case detail::node_impl::kind::step: {
      if (!step_ready(*n.step, visible)) co_return node_result{};
      auto op = run_step(*n.step, visible);
      bag out = co_await std::move(op);
      co_return node_result{std::move(out), true};
    }
    case detail::node_impl::kind::seq: {
      auto op = run_seq(n, cs, visible);
      co_return co_await std::move(op);
    }
    case detail::node_impl::kind::par: {
      auto op = run_par(n, cs, visible);
      co_return co_await std::move(op);
    }
  }
  co_return node_result{};
}
}  // namespace

// --- bundle ---------------------------------------------------------------------------------

bundle::bundle(node root, bundle_options options)
    : root_(std::move(root)), options_(std::move(options)) {
  if (options_.strict) strict_checker(options_.visible, options_.inputs).run(*root_.impl());
}

namespace {
// The coroutines behind bundle::operator() and repeat(). They take everything by value: an
// awaitable starts only when awaited (or spawned), possibly after the bundle object that
// made it is gone, so nothing may be read through `this` in a frame.
asio::awaitable<bag> run_call(std::shared_ptr<const detail::node_impl> root, bool strict,
                              bag initial, visibility mode) {
  initial.reset_producers();
  asio::any_io_executor ex = co_await asio::this_coro::executor;
  const call_state cs{mode, strict, &initial, std::move(ex)};
  auto op = run_node(*root, cs, initial);
  node_result r = co_await std::move(op);
  if (!r.ran) co_return initial;
  bag visible = initial;
  advance(visible, r.out, cs);
  co_return visible;
}

asio::awaitable<std::uint64_t> run_repeat(bundle self, bag initial, repeat_options options) {
  const asio::any_io_executor ex = co_await asio::this_coro::executor;
  std::uint64_t done = 0;
  const auto more = [&] {
    return !options.stop.stop_requested() &&
           (options.max_iterations == 0 || done < options.max_iterations);
  };
  while (more()) {
    auto op = self(initial);
    (void)co_await std::move(op);
    ++done;
    if (!more()) break;
    if (options.period.count() <= 0) {
      // An iteration may finish without suspending (skipped or immediate steps): go through
      // the loop's queue, so other handlers (and a cancellation) get their turn.
      auto yield = asio::post(ex, asio::use_awaitable);
      co_await std::move(yield);
      continue;
    }
    auto timer = std::make_shared<asio::steady_timer>(ex, options.period);
    // The stop token may fire on any thread; the timer belongs to the loop.
    std::stop_callback on_stop(options.stop, [timer, ex] {
      asio::post(ex, [timer] { timer->cancel(); });
    });
    auto wait = timer->async_wait(as_tuple(asio::use_awaitable));
    auto [ec] = co_await std::move(wait);
    if (ec == asio::error::operation_aborted && !options.stop.stop_requested()) {
      throw std::system_error(ec, "flow::bundle::repeat cancelled");
    }
  }
  co_return done;
}
}  // namespace

// --- stream -----------------------------------------------------------------------------------

namespace {
// The calls of one stream. They and the streaming coroutine run on one executor (one
// handler at a time), so plain fields are enough.
struct stream_state {
  explicit stream_state(const asio::any_io_executor& ex)
      : wake(ex) {}
  flow::detail::loop_event wake;
  std::map<std::uint64_t, bag> done;  // results not yet handed to the sink
  std::map<std::uint64_t, std::unique_ptr<asio::cancellation_signal>> running;
  std::vector<std::uint64_t> finished;  // calls whose signal can go
  std::size_t in_flight = 0;
  std::exception_ptr error;

  void cancel_all() {
    for (auto& [seq, sig] : running) sig->emit(asio::cancellation_type::terminal);
  }
  void fail(std::exception_ptr e) {
    if (!error) {
      error = std::move(e);
      cancel_all();
    }
  }
};

asio::awaitable<std::uint64_t> run_stream(bundle self, bag_source next, bag_sink sink,
                                          stream_options options) {
  if (options.max_in_flight == 0) {
    throw ferry::error(ferry::errc::invalid_argument,
                       "flow::bundle::stream: max_in_flight must be > 0");
  }
  const asio::any_io_executor ex = co_await asio::this_coro::executor;
  auto st = std::make_shared<stream_state>(ex);
  // Like par: the calls use this frame's sink and state, so it ends only after them.
  const bool throwing = co_await asio::this_coro::throw_if_cancelled();
  co_await asio::this_coro::throw_if_cancelled(false);
  std::uint64_t next_seq = 0, deliver_seq = 0, delivered = 0;
  bool source_done = false, cancelled = false;

  const auto hand_over = [&] {
    try {
      if (options.ordered) {
        for (auto it = st->done.find(deliver_seq); it != st->done.end(); it = st->done.find(deliver_seq)) {
          bag out = std::move(it->second);
          st->done.erase(it);
          ++deliver_seq;
          sink(std::move(out));
          ++delivered;
        }
      } else {
        while (!st->done.empty()) {
          bag out = std::move(st->done.begin()->second);
          st->done.erase(st->done.begin());
          sink(std::move(out));
          ++delivered;
        }
      }
    } catch (...) {
      st->fail(std::current_exception());
    }
  };

  for (;;) {
    while (!source_done && !st->error && !cancelled && st->in_flight < options.max_in_flight) {
      std::optional<bag> item;
      std::exception_ptr pull_error;
      try {
        auto op = next();
        item = co_await std::move(op);
      } catch (...) {
        pull_error = std::current_exception();
      }
      if (pull_error) {
        st->fail(std::move(pull_error));
        break;
      }
      if (!item) {
        source_done = true;
        break;
      }
      const std::uint64_t seq = next_seq++;
      auto signal = std::make_unique<asio::cancellation_signal>();
      asio::cancellation_slot slot = signal->slot();
      st->running.emplace(seq, std::move(signal));
      ++st->in_flight;
      asio::co_spawn(ex, self(std::move(*item)),
                     asio::bind_cancellation_slot(slot, [st, seq](std::exception_ptr e, bag out) {
                       --st->in_flight;
                       st->finished.push_back(seq);
                       if (e) {
                         st->fail(std::move(e));
                       } else {
                         st->done.emplace(seq, std::move(out));
                       }
                       st->wake.notify();
                     }));
    }
    for (std::uint64_t seq : st->finished) st->running.erase(seq);
    st->finished.clear();
    if (!st->error) hand_over();
    if (st->in_flight == 0 && (source_done || st->error || cancelled)) break;
    if (st->in_flight < options.max_in_flight && !source_done && !st->error && !cancelled) continue;
    if (!cancelled) {
      asio::cancellation_state cstate = co_await asio::this_coro::cancellation_state;
      if (cstate.cancelled() != asio::cancellation_type::none) {
        cancelled = true;
        st->cancel_all();
      }
    }
    if (st->in_flight == 0) continue;
    auto wait = st->wake.wait();
    co_await std::move(wait);
  }
  co_await asio::this_coro::throw_if_cancelled(throwing);
  if (st->error) std::rethrow_exception(st->error);
  if (cancelled) throw std::system_error(asio::error::operation_aborted, "flow::bundle::stream cancelled");
  co_return delivered;
}
}  // namespace

namespace detail {
asio::awaitable<std::optional<bag>> ready_bag(std::optional<bag> b) { co_return b; }
}  // namespace detail

asio::awaitable<std::uint64_t> bundle::stream(bag_source source, bag_sink sink,
                                              stream_options options) const {
  return run_stream(*this, std::move(source), std::move(sink), options);
}

asio::awaitable<bag> bundle::operator()(bag initial) const {
  return run_call(root_.impl(), options_.strict, std::move(initial), options_.visible);
}

asio::awaitable<bag> bundle::operator()(bag initial, visibility mode) const {
  return run_call(root_.impl(), options_.strict, std::move(initial), mode);
}

asio::awaitable<std::uint64_t> bundle::repeat(bag initial, repeat_options options) const {
  return run_repeat(*this, std::move(initial), std::move(options));
}

}  // namespace ferry::flow
