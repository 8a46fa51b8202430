// Error objects for the channel and the threaded iterators (kept out of the headers).
#include <ferry/from_thread_channel.hpp>
#include <ferry/threaded_iterable.hpp>

#include <asio/error.hpp>

#include <string>

namespace ferry::detail {

std::exception_ptr make_channel_closed_error(const char* what) {
  return std::make_exception_ptr(
      error(errc::channel_closed, std::string(what) + ": the channel is closed and drained"));
}

std::exception_ptr make_channel_timeout_error(const char* what) {
  return std::make_exception_ptr(
      error(errc::timed_out, std::string(what) + ": no item before the timeout"));
}

std::exception_ptr make_channel_aborted_error(const char* what) {
  return std::make_exception_ptr(error(make_error_code(asio::error::operation_aborted),
                                       std::string(what) + ": cancelled"));
}

std::exception_ptr make_iterator_launch_error(const char* what) {
  return std::make_exception_ptr(error(errc::pool_closed, std::string("threaded iterator: ") + what));
}
}  // namespace ferry::detail
