#define BOOST_TEST_MODULE ferry_error
#include "test_support.hpp"

#include <ferry/error.hpp>

FERRY_TEST_CASE(codes_belong_to_the_ferry_category_and_have_messages) {
  const std::error_code ec = ferry::errc::pool_closed;
  BOOST_TEST(ec.category().name() == std::string("ferry"));
  BOOST_TEST(ec.message().find("pool closed") != std::string::npos);
  BOOST_TEST(std::error_code(ferry::errc::loop_gone).message().find("loop") != std::string::npos);
}

FERRY_TEST_CASE(codes_map_to_portable_conditions) {
  BOOST_TEST((std::error_code(ferry::errc::would_deadlock) ==
              std::errc::resource_deadlock_would_occur));
  BOOST_TEST((std::error_code(ferry::errc::timed_out) == std::errc::timed_out));
  BOOST_TEST((std::error_code(ferry::errc::invalid_argument) == std::errc::invalid_argument));
}

FERRY_TEST_CASE(ferry_error_is_a_system_error_carrying_its_code_and_message) {
  try {
    throw ferry::error(ferry::errc::would_deadlock, "wait_idle on pool 'p'");
  } catch (const std::system_error& e) {
    BOOST_TEST((e.code() == ferry::errc::would_deadlock));
    BOOST_TEST(std::string(e.what()).find("wait_idle on pool 'p'") != std::string::npos);
  }
}
