#include <ferry/threaded.hpp>

#include <asio/error.hpp>

#if defined(__linux__)
#include <pthread.h>
#endif

namespace ferry::detail {

std::exception_ptr make_aborted_error() {
  return std::make_exception_ptr(
      error(make_error_code(asio::error::operation_aborted), "ferry: threaded call cancelled"));
}

std::exception_ptr make_pool_closed_error() {
  return std::make_exception_ptr(
      error(errc::pool_closed, "ferry: the pool stopped before the threaded call ran"));
}

std::string call_site_name(const std::source_location& where) {
  std::string file = where.file_name();
  if (const auto slash = file.find_last_of('/'); slash != std::string::npos) {
    file = file.substr(slash + 1);
  }
  if (const auto dot = file.find_last_of('.'); dot != std::string::npos) file.resize(dot);
  return file + ":" + std::to_string(where.line());
}

void start_separate_thread(std::string name, std::function<void()> body) {
  std::thread t([name, body = std::move(body)]() mutable {
#if defined(__linux__)
    const std::string short_name = name.substr(0, 15);
    pthread_setname_np(pthread_self(), short_name.c_str());
#endif
    body();
  });
  t.detach();  // accounted for by the loop's separate_thread_registry
}

}  // namespace ferry::detail

