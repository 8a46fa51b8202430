// The non-template parts of ferry/flow/pipeline.hpp.
#include <ferry/flow/pipeline.hpp>

#include <asio/error.hpp>

#include <exception>
#include <system_error>

namespace ferry::flow::detail {

bool is_channel_closed(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const ferry::error& x) {
    return x.code() == ferry::errc::channel_closed;
  } catch (...) {
    return false;
  }
}

std::exception_ptr make_pipeline_aborted() {
  return std::make_exception_ptr(
      std::system_error(asio::error::operation_aborted, "flow pipeline cancelled"));
}

}  // namespace ferry::flow::detail
