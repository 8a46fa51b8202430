// ferry/flow/detail/result_shape.hpp — how a step's or an operation's result splits into
// outputs: awaitable detection, optionals, tuple-likes and aggregates (up to 8 members).
#pragma once

#include <asio/awaitable.hpp>

#include <cstddef>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace ferry::flow::detail {

template <class T>
struct is_awaitable : std::false_type {};
template <class T, class E>
struct is_awaitable<asio::awaitable<T, E>> : std::true_type {};
template <class T>
struct awaitable_value {
  using type = T;
};
template <class T, class E>
struct awaitable_value<asio::awaitable<T, E>> {
  using type = T;
};

template <class T>
struct is_optional : std::false_type {};
template <class T>
struct is_optional<std::optional<T>> : std::true_type {};

// --- aggregate members as a tuple of references (up to 8 members) ------------------------
struct any_init {
  template <class T>
  operator T() const;
};
template <class T, class... A>
constexpr std::size_t member_count() {
  if constexpr (sizeof...(A) > 8) {
    return 0;
  } else if constexpr (requires { T{A{}..., any_init{}}; }) {
    return member_count<T, A..., any_init>();
  } else {
    return sizeof...(A);
  }
}
template <std::size_t N, class T>
auto members(T&& v) {
  if constexpr (N == 1) {
    auto&& [a] = v;
    return std::forward_as_tuple(a);
  } else if constexpr (N == 2) {
    auto&& [a, b] = v;
    return std::forward_as_tuple(a, b);
  } else if constexpr (N == 3) {
    auto&& [a, b, c] = v;
    return std::forward_as_tuple(a, b, c);
  } else if constexpr (N == 4) {
    auto&& [a, b, c, d] = v;
    return std::forward_as_tuple(a, b, c, d);
  } else if constexpr (N == 5) {
    auto&& [a, b, c, d, e] = v;
    return std::forward_as_tuple(a, b, c, d, e);
  } else if constexpr (N == 6) {
    auto&& [a, b, c, d, e, f] = v;
    return std::forward_as_tuple(a, b, c, d, e, f);
  } else if constexpr (N == 7) {
    auto&& [a, b, c, d, e, f, g] = v;
    return std::forward_as_tuple(a, b, c, d, e, f, g);
  } else {
    auto&& [a, b, c, d, e, f, g, h] = v;
    return std::forward_as_tuple(a, b, c, d, e, f, g, h);
  }
}

template <class R, std::size_t N>
constexpr bool tuple_like_of_size() {
  if constexpr (requires { std::tuple_size<R>::value; }) {
    return std::tuple_size<R>::value == N;
  } else {
    return false;
  }
}

}  // namespace ferry::flow::detail
