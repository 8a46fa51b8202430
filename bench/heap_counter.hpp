// bench/heap_counter.hpp — counts every call into the heap, for the "allocations per task"
// scenarios. Include it in exactly one translation unit of a benchmark program: it replaces
// the global operator new/delete and, on glibc, interposes the C allocation functions.
// Switch counting on with g_count_allocations; read heap_allocations() / g_new_calls.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

// Global operator new/delete are replaced (every overload, including the sized, aligned and
// nothrow ones) and count their calls. That alone would miss allocations that bypass
// operator new: Asio allocates its handler memory with std::aligned_alloc, for one. So on
// glibc the C heap entry points are interposed as well (forwarding to glibc's own
// __libc_* functions; memory still comes from, and goes back to, glibc), and the benchmarks report
// every call into the heap. Counting is switched on only around the measured rounds; the
// rest of the program pays one relaxed load of a read-mostly flag per allocation.
namespace {
std::atomic<bool> g_count_allocations{false};
std::atomic<std::uint64_t> g_heap_allocations{0};  // any heap entry point
std::atomic<std::uint64_t> g_new_calls{0};         // of which through operator new

bool counting() noexcept { return g_count_allocations.load(std::memory_order_relaxed); }
void note_new_call() noexcept {
  if (counting()) g_new_calls.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

#if defined(__GLIBC__)
#define FERRY_BENCH_COUNTS_C_HEAP 1
extern "C" {
void* __libc_malloc(std::size_t size) noexcept;
void* __libc_calloc(std::size_t count, std::size_t size) noexcept;
void* __libc_realloc(void* p, std::size_t size) noexcept;
void* __libc_memalign(std::size_t align, std::size_t size) noexcept;
}

namespace {
void note_heap_allocation() noexcept {
  if (counting()) g_heap_allocations.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

extern "C" {
void* malloc(std::size_t size) noexcept {
  note_heap_allocation();
  return __libc_malloc(size);
}
void* calloc(std::size_t count, std::size_t size) noexcept {
  note_heap_allocation();
  return __libc_calloc(count, size);
}
void* realloc(void* p, std::size_t size) noexcept {
  note_heap_allocation();
  return __libc_realloc(p, size);
}
void* aligned_alloc(std::size_t align, std::size_t size) noexcept {
  note_heap_allocation();
  return __libc_memalign(align, size);
}
void* memalign(std::size_t align, std::size_t size) noexcept {
  note_heap_allocation();
  return __libc_memalign(align, size);
}
int posix_memalign(void** out, std::size_t align, std::size_t size) noexcept {
  if (align == 0 || align % sizeof(void*) != 0 || (align & (align - 1)) != 0) return EINVAL;
  note_heap_allocation();
  void* p = __libc_memalign(align, size);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}
}  // extern "C"
#endif

namespace {
void* allocate_or_null(std::size_t n) noexcept {
  note_new_call();
  return std::malloc(n != 0 ? n : 1);  // counted by the interposed malloc
}

void* allocate_aligned_or_null(std::size_t n, std::align_val_t align) noexcept {
  note_new_call();
  std::size_t a = static_cast<std::size_t>(align);
  if (a < sizeof(void*)) a = sizeof(void*);
  void* p = nullptr;
  return posix_memalign(&p, a, n != 0 ? n : 1) == 0 ? p : nullptr;
}

template <class Alloc>
void* allocate_or_throw(Alloc alloc) {
  for (;;) {
    if (void* p = alloc()) return p;
    std::new_handler handler = std::get_new_handler();
    if (!handler) throw std::bad_alloc();
    handler();
  }
}

std::uint64_t heap_allocations() noexcept {
#ifdef FERRY_BENCH_COUNTS_C_HEAP
  return g_heap_allocations.load(std::memory_order_relaxed);
#else
  return g_new_calls.load(std::memory_order_relaxed);
#endif
}
}  // namespace

void* operator new(std::size_t n) {
  return allocate_or_throw([n] { return allocate_or_null(n); });
}
void* operator new[](std::size_t n) {
  return allocate_or_throw([n] { return allocate_or_null(n); });
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return allocate_or_null(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  return allocate_or_null(n);
}
void* operator new(std::size_t n, std::align_val_t a) {
  return allocate_or_throw([n, a] { return allocate_aligned_or_null(n, a); });
}
void* operator new[](std::size_t n, std::align_val_t a) {
  return allocate_or_throw([n, a] { return allocate_aligned_or_null(n, a); });
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return allocate_aligned_or_null(n, a);
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return allocate_aligned_or_null(n, a);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  std::free(p);
}

