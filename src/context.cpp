#include <ferry/context.hpp>

#include <algorithm>

namespace ferry::detail {

namespace {
thread_local context_frame tls_thread_frame;
thread_local context_frame* tls_current = nullptr;
std::atomic<std::uint64_t> var_ids{1};
}  // namespace

const context_map::entry* context_map::find(std::uint64_t id) const noexcept {
  // Few variables per context: a linear scan beats a binary search here.
  for (const entry& e : entries) {
    if (e.id == id) return &e;
  }
  return nullptr;
}

std::shared_ptr<const context_map> context_map::with(std::uint64_t id,
                                                     std::shared_ptr<const void> value) const {
  auto copy = std::make_shared<context_map>();
  copy->entries.reserve(entries.size() + 1);
  for (const entry& e : entries) {
    if (e.id != id) copy->entries.push_back(e);
  }
  if (value) copy->entries.push_back({id, std::move(value)});
  if (copy->entries.empty()) return nullptr;
  return copy;
}

context_frame& current_frame() noexcept {
  return tls_current ? *tls_current : tls_thread_frame;
}

context_scope::context_scope(context_frame& frame) noexcept : previous_(tls_current) {
  tls_current = &frame;
}

context_scope::~context_scope() { tls_current = previous_; }

std::uint64_t next_context_var_id() noexcept {
  return var_ids.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace ferry::detail

#include <ferry/detail/current_loop.hpp>

namespace ferry::detail {
namespace {
thread_local loop_ref tls_loop;
}
loop_ref current_loop() noexcept { return tls_loop; }
loop_scope::loop_scope(loop_ref loop) noexcept : previous_(tls_loop) { tls_loop = loop; }
loop_scope::~loop_scope() { tls_loop = previous_; }
}  // namespace ferry::detail
