#include <ferry/detail/loop_service.hpp>

#include <atomic>
#include <cstdio>
#include <utility>

namespace ferry::detail {

std::uint64_t separate_thread_registry::add(std::string name) {
  std::lock_guard lock(mu_);
  const std::uint64_t id = next_id_++;
  threads_.emplace(id, entry{std::move(name), std::chrono::steady_clock::now()});
  return id;
}

void separate_thread_registry::remove(std::uint64_t id) noexcept {
  std::lock_guard lock(mu_);
  threads_.erase(id);
  if (threads_.empty()) cv_.notify_all();
}

std::vector<running_thread> separate_thread_registry::running() const {
  std::lock_guard lock(mu_);
  std::vector<running_thread> out;
  const auto now = std::chrono::steady_clock::now();
  for (const auto& [id, e] : threads_) out.push_back({e.name, now - e.started});
  return out;
}

std::vector<running_thread> separate_thread_registry::wait_all_for(
    std::chrono::nanoseconds timeout) {
  {
    std::unique_lock lock(mu_);
    if (cv_.wait_for(lock, timeout, [&] { return threads_.empty(); })) return {};
  }
  return running();
}

std::uint64_t producer_registry::add(std::function<void()> stop) {
  {
    std::lock_guard lock(mu_);
    if (!closed_) {
      const std::uint64_t id = next_id_++;
      stops_.emplace(id, std::move(stop));
      return id;
    }
  }
  stop();
  return 0;
}

void producer_registry::remove(std::uint64_t id) noexcept {
  std::lock_guard lock(mu_);
  stops_.erase(id);
}

void producer_registry::stop_all() noexcept {
  std::map<std::uint64_t, std::function<void()>> stops;
  {
    std::lock_guard lock(mu_);
    closed_ = true;
    stops.swap(stops_);
  }
  for (auto& [id, stop] : stops) {
    try {
      stop();
    } catch (...) {
    }
  }
}

namespace {
std::atomic<std::uint64_t> service_generation{1};
struct service_cache {
  asio::execution_context* ctx = nullptr;
  loop_service* service = nullptr;
  std::uint64_t generation = 0;
};
thread_local service_cache tls_service_cache;
}  // namespace

loop_service& loop_service::of(asio::execution_context& ctx) {
  service_cache& c = tls_service_cache;
  const std::uint64_t gen = service_generation.load(std::memory_order_acquire);
  if (c.ctx == &ctx && c.generation == gen) return *c.service;
  loop_service& svc = asio::use_service<loop_service>(ctx);
  // Cache under the generation read *before* the lookup: anything destroyed since then
  // (and our own creation) invalidates the entry; the next call refreshes it.
  c = {&ctx, &svc, gen};
  return svc;
}

loop_service::loop_service(asio::execution_context& ctx)
    : asio::execution_context::service(ctx),
      completions_(std::make_shared<completion_queue>()),
      threads_(std::make_shared<separate_thread_registry>()) {
  service_generation.fetch_add(1, std::memory_order_acq_rel);
}

loop_service::~loop_service() { service_generation.fetch_add(1, std::memory_order_acq_rel); }

thread_pool& loop_service::default_pool() {
  if (asio::has_service<pool_identity>(context())) {
    if (thread_pool* self = asio::use_service<pool_identity>(context()).pool) return *self;
  }
  std::lock_guard lock(pool_mu_);
  if (!pool_) {
    thread_pool_options o;
    o.name = "ferry-default";
    owned_pool_ = std::make_unique<thread_pool>(std::move(o));
    pool_ = owned_pool_.get();
  }
  return *pool_;
}

void loop_service::set_default_pool(thread_pool& pool) {
  std::lock_guard lock(pool_mu_);
  pool_ = &pool;  // a previously owned pool stays alive until shutdown (calls may run on it)
}

bool loop_service::add_pending(pending_wait* w) noexcept {
  std::lock_guard lock(pending_mu_);
  if (pending_closed_) return false;
  w->pending_prev = nullptr;
  w->pending_next = pending_;
  if (pending_) pending_->pending_prev = w;
  pending_ = w;
  return true;
}

void loop_service::remove_pending(pending_wait* w) noexcept {
  std::lock_guard lock(pending_mu_);
  if (pending_closed_) return;  // shutdown owns the list now
  if (w->pending_prev) {
    w->pending_prev->pending_next = w->pending_next;
  } else if (pending_ == w) {
    pending_ = w->pending_next;
  } else {
    return;  // not registered
  }
  if (w->pending_next) w->pending_next->pending_prev = w->pending_prev;
  w->pending_prev = w->pending_next = nullptr;
}

void loop_service::shutdown() {
  {
    std::lock_guard lock(liveness_->mu);
    liveness_->gone = true;
  }
  // 0. Producers of threaded iterators consumed on this loop are stopped (their channels
  //    closed), so none of them keeps a pool worker or a thread busy through what follows.
  producers_->stop_all();
  //    Waits suspended on this loop are dropped: their handlers (coroutine frames) are
  //    destroyed, which destroys the iterators they own and so stops their producers.
  pending_wait* waits = nullptr;
  {
    std::lock_guard lock(pending_mu_);
    pending_closed_ = true;
    waits = std::exchange(pending_, nullptr);
  }
  while (waits) {
    pending_wait* next = waits->pending_next;
    waits->abort_pending(waits);
    waits = next;
  }
  // 1. The default pool this loop owns: queued calls complete with pool_closed, running
  //    ones finish (join). Their results are pushed while the queue still accepts them.
  std::unique_ptr<thread_pool> owned;
  {
    std::lock_guard lock(pool_mu_);
    owned = std::move(owned_pool_);
    pool_ = nullptr;
  }
  owned.reset();
  // 2. Threads started by threaded_separate are waited for, boundedly, then reported.
  const auto still = threads_->wait_all_for(separate_wait_);
  for (const auto& t : still) {
    std::fprintf(stderr,
                 "ferry: threaded_separate thread '%s' still running after its loop was "
                 "destroyed; left detached\n",
                 t.name.c_str());
  }
  // 3. Results not delivered are discarded while the loop's services still exist (their
  //    handlers are destroyed, as Asio does with its own pending operations).
  completions_->close();
}

}  // namespace ferry::detail
