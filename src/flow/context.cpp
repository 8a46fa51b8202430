// ferry::flow::context — the scope behind the dataflow layer (see include/ferry/flow/context.hpp).
#include <ferry/flow/context.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/error.hpp>
#include <asio/experimental/channel.hpp>

#include <cstdio>
#include <cstdlib>
#include <cxxabi.h>
#include <list>
#include <map>
#include <mutex>

namespace ferry::flow {

// --- the shared state of one scope -----------------------------------------------------------
namespace detail {

void check_name(std::string_view name) {
  bool ok = !name.empty();
  for (char c : name) {
    const bool word = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                      c == '_';
    ok = ok && word;
  }
  if (!ok) {
    throw ferry::error(make_error_code(errc::invalid_name),
                       "ferry::flow: resource name '" + std::string(name) +
                           "' is not a non-empty identifier of letters, digits and underscores");
  }
}

void throw_null_resource(const std::string& type, std::string_view name) {
  throw ferry::error(make_error_code(errc::null_resource),
                     "ferry::flow: a null value offered as resource of type " + type + " named '" +
                         std::string(name) + "'");
}

// Request waiters of one context tree (an add anywhere may satisfy a waiter below it).
struct tree_state {
  ferry::detail::loop_waiters waiters;
};

class context_impl : public std::enable_shared_from_this<context_impl> {
public:
  enum class phase { open, closing, closed };

  context_impl(asio::any_io_executor executor, std::shared_ptr<context_impl> up)
      : ex(std::move(executor)),
        parent(std::move(up)),
        tree(parent ? parent->tree : std::make_shared<tree_state>()) {}

  ~context_impl() {
    if (state != phase::closed && !callbacks.empty()) {
      std::fprintf(stderr,
                   "ferry::flow::context destroyed without close(): %zu teardown callback(s) "
                   "never ran\n",
                   callbacks.size());
    }
  }

  asio::any_io_executor ex;
  const std::shared_ptr<context_impl> parent;
  const std::shared_ptr<tree_state> tree;

  mutable std::mutex mu;  // guards everything below
  phase state = phase::open;
  std::map<resource_key, std::shared_ptr<void>> resources;
  std::map<resource_key, std::shared_ptr<factory_entry>> factories;
  std::vector<teardown_callback> callbacks;
  struct task {
    asio::cancellation_signal signal;
    bool done = false;
  };
  std::list<task> tasks;
  std::size_t live_tasks = 0;
  std::vector<std::exception_ptr> task_errors;
  ferry::detail::loop_waiters task_waiters;

  void check_usable(const char* what) const {  // with mu held
    if (state == phase::closed) {
      throw ferry::error(make_error_code(errc::context_closed),
                         std::string("ferry::flow::context::") + what + ": the context is closed");
    }
  }

  bool has_key(const resource_key& key) const {
    for (const context_impl* c = this; c; c = c->parent.get()) {
      std::lock_guard lock(c->mu);
      if (c->resources.count(key) != 0 || c->factories.count(key) != 0) return true;
    }
    return false;
  }
};

}  // namespace detail

// --- context ---------------------------------------------------------------------------------
context::context(asio::any_io_executor ex)
    : impl_(std::make_shared<detail::context_impl>(std::move(ex), nullptr)) {}

context context::make_child() const { return make_child(impl_->ex); }

context context::make_child(asio::any_io_executor ex) const {
  {
    std::lock_guard lock(impl_->mu);
    impl_->check_usable("make_child");
  }
  return context(std::make_shared<detail::context_impl>(std::move(ex), impl_));
}

asio::any_io_executor context::get_executor() const { return impl_->ex; }

std::optional<context> context::parent() const {
  if (!impl_->parent) return std::nullopt;
  return context(impl_->parent);
}

bool context::closed() const noexcept {
  std::lock_guard lock(impl_->mu);
  return impl_->state == detail::context_impl::phase::closed;
}

bool context::closing() const noexcept {
  std::lock_guard lock(impl_->mu);
  return impl_->state != detail::context_impl::phase::open;
}

void context::add_values(std::vector<detail::typed_value> values, const std::string& type) const {
  {
    std::lock_guard lock(impl_->mu);
    impl_->check_usable("add_resource");
    for (const auto& [key, value] : values) {
      if (impl_->resources.count(key) != 0) {
        throw resource_conflict(type_name(key.type), key.name,
                                "ferry::flow: this context already has a resource of type " +
                                    type_name(key.type) + " named '" + key.name +
                                    "' (while adding a " + type + ")");
      }
    }
    for (auto& [key, value] : values) impl_->resources.emplace(key, std::move(value));
  }
  impl_->tree->waiters.wake_all();
}

void context::add_factory(std::vector<std::type_index> keys, std::string name,
                          detail::factory_entry entry) const {
  auto shared = std::make_shared<detail::factory_entry>(std::move(entry));
  {
    std::lock_guard lock(impl_->mu);
    impl_->check_usable("add_resource_factory");
    for (const auto& t : keys) {
      if (impl_->factories.count(detail::resource_key{t, name}) != 0) {
        throw resource_conflict(type_name(t), name,
                                "ferry::flow: this context already has a resource factory for "
                                "type " + type_name(t) + " named '" + name + "'");
      }
    }
    for (const auto& t : keys) impl_->factories.emplace(detail::resource_key{t, name}, shared);
  }
  impl_->tree->waiters.wake_all();
}

std::shared_ptr<void> context::lookup(std::type_index type, std::string_view name) const {
  detail::check_name(name);
  const detail::resource_key key{type, std::string(name)};
  {
    std::lock_guard lock(impl_->mu);
    impl_->check_usable("get");
    if (auto it = impl_->resources.find(key); it != impl_->resources.end()) return it->second;
  }
  // A factory here or in the nearest ancestor generates the value into this context.
  std::shared_ptr<detail::factory_entry> factory;
  for (const detail::context_impl* c = impl_.get(); c && !factory; c = c->parent.get()) {
    std::lock_guard lock(c->mu);
    if (auto it = c->factories.find(key); it != c->factories.end()) factory = it->second;
  }
  if (factory) {
    context requester(impl_);
    std::vector<detail::typed_value> values = factory->make(requester, key.name);  // user code
    std::shared_ptr<void> result;
    {
      std::lock_guard lock(impl_->mu);
      if (auto it = impl_->resources.find(key); it != impl_->resources.end()) {
        return it->second;  // generated concurrently (or by the factory itself): keep that one
      }
      for (auto& [k, v] : values) {
        if (k.type == key.type && k.name == key.name) result = v;
        impl_->resources.emplace(k, std::move(v));
      }
    }
    return result;
  }
  for (const detail::context_impl* c = impl_->parent.get(); c; c = c->parent.get()) {
    std::lock_guard lock(c->mu);
    if (auto it = c->resources.find(key); it != c->resources.end()) return it->second;
  }
  return {};
}

asio::awaitable<std::error_code> context::wait_for_key(
    std::type_index type, const std::string& name,
    std::optional<std::chrono::steady_clock::time_point> deadline) const {
  std::shared_ptr<detail::context_impl> impl = impl_;
  detail::resource_key key{type, name};
  detail::context_impl* raw = impl.get();
  // Built in its own statement: no temporary with a destructor may live across the
  // suspension (g++ 12 destroys such temporaries wrongly).
  auto wait = ferry::detail::async_wait_until(
      impl->tree->waiters, impl, [raw, key] { return raw->has_key(key); }, deadline,
      asio::experimental::as_tuple(asio::use_awaitable));
  std::tuple<std::error_code> r = co_await std::move(wait);
  co_return std::get<0>(r);
}

void context::add_callback(detail::teardown_callback cb) const {
  std::lock_guard lock(impl_->mu);
  impl_->check_usable("add_teardown_callback");
  impl_->callbacks.push_back(std::move(cb));
}

void context::spawn(asio::awaitable<void> task) {
  std::list<detail::context_impl::task>::iterator slot;
  {
    std::lock_guard lock(impl_->mu);
    if (impl_->state != detail::context_impl::phase::open) {
      throw ferry::error(make_error_code(errc::context_closed),
                         "ferry::flow::context::spawn: the context is closing or closed");
    }
    // Forget finished tasks (their signals are no longer in use).
    for (auto it = impl_->tasks.begin(); it != impl_->tasks.end();) {
      it = it->done ? impl_->tasks.erase(it) : std::next(it);
    }
    slot = impl_->tasks.emplace(impl_->tasks.end());
    ++impl_->live_tasks;
  }
  std::shared_ptr<detail::context_impl> impl = impl_;
  asio::co_spawn(impl_->ex, std::move(task),
                 asio::bind_cancellation_slot(
                     slot->signal.slot(), [impl, slot](std::exception_ptr e) {
                       {
                         std::lock_guard lock(impl->mu);
                         slot->done = true;
                         --impl->live_tasks;
                         if (e) {
                           bool cancelled = false;
                           try {
                             std::rethrow_exception(e);
                           } catch (const std::system_error& x) {
                             cancelled = x.code() == asio::error::operation_aborted;
                           } catch (...) {
                           }
                           if (!cancelled) impl->task_errors.push_back(std::move(e));
                         }
                       }
                       impl->task_waiters.wake_all();
                     }));
}

asio::awaitable<void> context::close(std::exception_ptr exception) {
  std::shared_ptr<detail::context_impl> impl = impl_;
  using phase = detail::context_impl::phase;
  std::vector<asio::cancellation_signal*> signals;
  {
    std::lock_guard lock(impl->mu);
    if (impl->state == phase::closing) {
      throw ferry::error(make_error_code(errc::context_closed),
                         "ferry::flow::context::close: already closing (close() from a teardown "
                         "callback?)");
    }
    impl->check_usable("close");
    impl->state = phase::closing;
    for (auto& t : impl->tasks) {
      if (!t.done) signals.push_back(&t.signal);
    }
  }
  // R10: tasks first, so none outlives the resources the callbacks release.
  for (asio::cancellation_signal* s : signals) s->emit(asio::cancellation_type::terminal);
  detail::context_impl* raw = impl.get();
  auto wait = ferry::detail::async_wait_until(
      impl->task_waiters, impl,
      [raw] {
        std::lock_guard lock(raw->mu);
        return raw->live_tasks == 0;
      },
      std::nullopt, asio::experimental::as_tuple(asio::use_awaitable));
  std::tuple<std::error_code> waited = co_await std::move(wait);
  (void)waited;
  std::vector<std::exception_ptr> errors;
  {
    std::lock_guard lock(impl->mu);
    errors.swap(impl->task_errors);
    impl->tasks.clear();
  }
  // R6/R7: newest first, one at a time; callbacks added meanwhile form the next batch.
  for (;;) {
    std::vector<detail::teardown_callback> batch;
    {
      std::lock_guard lock(impl->mu);
      batch.swap(impl->callbacks);
    }
    if (batch.empty()) break;
    for (auto it = batch.rbegin(); it != batch.rend(); ++it) {
      try {
        if (it->sync) {
          it->sync(exception);
        } else {
          asio::awaitable<void> step = it->async(exception);
          co_await std::move(step);
        }
      } catch (...) {
        errors.push_back(std::current_exception());
      }
    }
  }
  {
    std::lock_guard lock(impl->mu);
    impl->state = phase::closed;
  }
  if (!errors.empty()) throw teardown_error(std::move(errors));
}

asio::awaitable<void> close_after_block(context child, std::exception_ptr block_failure) {
  if (!block_failure) {
    co_await child.close();
    co_return;
  }
  try {
    co_await child.close(block_failure);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry::flow::scoped: teardown failed after the block threw: %s\n",
                 e.what());
  }
}

// --- context_teardown --------------------------------------------------------------------------
struct closing_signal::state {
  using event = asio::experimental::channel<void(std::error_code, std::exception_ptr)>;
  explicit state(const asio::any_io_executor& ex) : setup(ex, 1), closing(ex, 1), done(ex, 1) {}
  event setup;    // fn reached wait() (null), or ended before it (its exception or null)
  event closing;  // the context closes, with this exception
  event done;     // fn finished after the wait, with its exception or null
  bool setup_sent = false;
  bool ended_early = false;
};

asio::awaitable<std::exception_ptr> closing_signal::wait() {
  std::shared_ptr<state> s = state_;
  if (!s->setup_sent) {
    s->setup_sent = true;
    s->setup.try_send(std::error_code{}, std::exception_ptr{});
  }
  std::tuple<std::error_code, std::exception_ptr> r =
      co_await s->closing.async_receive(asio::experimental::as_tuple(asio::use_awaitable));
  co_return std::get<1>(r);
}

namespace {
asio::awaitable<void> run_teardown_fn(
    std::shared_ptr<closing_signal::state> s, context ctx,
    std::shared_ptr<std::function<asio::awaitable<void>(context&, closing_signal)>> fn) {
  asio::awaitable<void> body = (*fn)(ctx, closing_signal(s));
  co_await std::move(body);
}
}  // namespace

asio::awaitable<void> context_teardown(
    const context& ctx, std::function<asio::awaitable<void>(context&, closing_signal)> fn) {
  if (ctx.closing()) {
    throw ferry::error(make_error_code(errc::context_closed),
                       "ferry::flow::context_teardown: the context is closing or closed");
  }
  auto s = std::make_shared<closing_signal::state>(ctx.get_executor());
  auto f = std::make_shared<std::function<asio::awaitable<void>(context&, closing_signal)>>(
      std::move(fn));
  asio::co_spawn(ctx.get_executor(), run_teardown_fn(s, ctx, f), [s](std::exception_ptr e) {
    if (!s->setup_sent) {
      s->setup_sent = true;
      s->ended_early = true;
      s->setup.try_send(std::error_code{}, std::move(e));
    } else {
      s->done.try_send(std::error_code{}, std::move(e));
    }
  });
  std::tuple<std::error_code, std::exception_ptr> r =
      co_await s->setup.async_receive(asio::experimental::as_tuple(asio::use_awaitable));
  if (std::get<1>(r)) std::rethrow_exception(std::get<1>(r));
  if (s->ended_early) co_return;
  context target = ctx;
  std::exception_ptr refused;
  try {
    target.add_teardown_callback([s](std::exception_ptr closing) -> asio::awaitable<void> {
      s->closing.try_send(std::error_code{}, std::move(closing));
      std::tuple<std::error_code, std::exception_ptr> d =
          co_await s->done.async_receive(asio::experimental::as_tuple(asio::use_awaitable));
      if (std::get<1>(d)) std::rethrow_exception(std::get<1>(d));
    });
  } catch (...) {
    refused = std::current_exception();  // the context closed during the set-up
  }
  if (refused) {
    // Nobody will close it for us: run the teardown part now, with the refusal as the
    // closing exception, then report the refusal.
    s->closing.try_send(std::error_code{}, refused);
    std::tuple<std::error_code, std::exception_ptr> d =
        co_await s->done.async_receive(asio::experimental::as_tuple(asio::use_awaitable));
    (void)d;
    std::rethrow_exception(refused);
  }
}

}  // namespace ferry::flow
