#include <ferry/error.hpp>

namespace ferry {
namespace {

class ferry_category final : public std::error_category {
public:
  const char* name() const noexcept override { return "ferry"; }

  std::string message(int value) const override {
    switch (static_cast<errc>(value)) {
      case errc::pool_closed: return "pool closed: the thread pool was stopped";
      case errc::would_deadlock: return "refused: the call would deadlock";
      case errc::invalid_argument: return "invalid argument";
      case errc::timed_out: return "timed out";
      case errc::channel_closed: return "channel closed";
      case errc::loop_gone: return "the event loop stopped before the operation completed";
      case errc::no_value: return "no value in this context";
      case errc::no_loop: return "no event loop is known to this thread";
      case errc::invalid_token: return "invalid context token";
    }
    return "unknown ferry error";
  }

  std::error_condition default_error_condition(int value) const noexcept override {
    switch (static_cast<errc>(value)) {
      case errc::would_deadlock: return std::errc::resource_deadlock_would_occur;
      case errc::invalid_argument: return std::errc::invalid_argument;
      case errc::timed_out: return std::errc::timed_out;
      default: return {value, *this};
    }
  }
};

}  // namespace

const std::error_category& error_category() noexcept {
  static const ferry_category category;
  return category;
}

}  // namespace ferry
