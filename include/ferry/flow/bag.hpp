// ferry/flow/bag.hpp — typed keys and the bag of named values a step flow carries.
//
//     namespace fl = ferry::flow;
//     const fl::key<std::string> endpoint{"endpoint"};
//     const fl::key<std::vector<int>> data{"data"};
//
//     fl::bag b{endpoint("http://a"), data({1, 2, 3})};
//     b.set(endpoint, "http://b");              // replaces
//     const std::string& e = b.at(endpoint);    // missing: flow::missing_key naming "endpoint"
//     if (const auto* d = b.find(data)) use(*d);
//
// Rules (spec/flow-pipelines.md F1):
//  * A key<T> is a name and a type. The name is the identity inside a bag: one value per
//    name. Asking for a name with another type than the one stored is errc::type_mismatch
//    naming the key and both types (never a silent reinterpretation).
//  * Values are immutable once in a bag and shared, not copied, when a bag is copied: a
//    `par` hands each branch the same values. T must be copy- or move-constructible.
//  * Names are non-empty; an empty name is errc::invalid_name.
//  * A bag is a value type and not synchronised: one bag, one thread at a time.
#pragma once

#include <ferry/flow/error.hpp>

#include <concepts>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <typeinfo>
#include <utility>
#include <vector>

namespace ferry::flow {

template <class T>
class key;
class bag;

namespace detail {

// Per-type operations on a stored value; one static instance per T.
struct value_ops {
  const std::type_info& type;
  // Null when T has no operator==: two values of such a type are equal only when they are
  // the same object (the same shared value).
  bool (*equal)(const void*, const void*);
};

template <class T>
bool equal_values(const void* a, const void* b) {
  return static_cast<bool>(*static_cast<const T*>(a) == *static_cast<const T*>(b));
}

template <class T>
inline constexpr value_ops ops_of{typeid(T),
                                  std::equality_comparable<T> ? &equal_values<T> : nullptr};

struct bag_slot {
  std::string name;
  std::shared_ptr<const void> value;
  const value_ops* ops = nullptr;
  // The step that produced the value, for merge-conflict messages. It points into the step
  // tree of the flow call that produced it (or at a static "<initial>"), and is reset to
  // "<initial>" whenever a bag enters a call, so it is never read after its step is gone.
  const char* producer = "<initial>";
};

[[noreturn]] void throw_invalid_key_name();
[[noreturn]] void throw_missing_key(std::string_view name);
[[noreturn]] void throw_key_type_mismatch(std::string_view name, const std::type_info& stored,
                                          const std::type_info& wanted);

}  // namespace detail

// A value bound to a key, ready to go into a bag: `endpoint("http://a")`.
template <class T>
struct key_value {
  std::string name;
  T value;
};

// The name and type of a key, without the type in the signature (declared inputs, mapping).
struct key_spec {
  std::string name;
  const std::type_info* type = nullptr;

  key_spec() = default;
  template <class T>
  key_spec(const key<T>& k) : name(k.name()), type(&typeid(T)) {}  // NOLINT: implicit on purpose
};

template <class T>
class key {
public:
  using value_type = T;

  explicit key(std::string name) : name_(std::move(name)) {
    if (name_.empty()) detail::throw_invalid_key_name();
  }
  key(const char* name) : key(std::string(name)) {}  // NOLINT: key<int> k = "k" reads well

  const std::string& name() const noexcept { return name_; }

  template <class U>
    requires std::constructible_from<T, U&&>
  key_value<T> operator()(U&& v) const {
    return {name_, T(std::forward<U>(v))};
  }

private:
  std::string name_;
};

class bag {
public:
  bag() = default;
  template <class... T>
  explicit(false) bag(key_value<T>... values) {
    slots_.reserve(sizeof...(T));
    (put(std::move(values.name), std::make_shared<const T>(std::move(values.value)),
         &detail::ops_of<T>),
     ...);
  }

  // Stores v under k's name, replacing whatever was there.
  template <class T, class U>
    requires std::constructible_from<T, U&&>
  bag& set(const key<T>& k, U&& v) {
    put(k.name(), std::make_shared<const T>(std::forward<U>(v)), &detail::ops_of<T>);
    return *this;
  }

  // The value under k's name, or nullptr. A value of another type: errc::type_mismatch.
  template <class T>
  const T* find(const key<T>& k) const {
    const detail::bag_slot* s = slot(k.name());
    if (s == nullptr) return nullptr;
    if (s->ops->type != typeid(T)) detail::throw_key_type_mismatch(k.name(), s->ops->type, typeid(T));
    return static_cast<const T*>(s->value.get());
  }

  // The value under k's name; absent: flow::missing_key (errc::missing_key) naming it.
  template <class T>
  const T& at(const key<T>& k) const {
    const T* v = find(k);
    if (v == nullptr) detail::throw_missing_key(k.name());
    return *v;
  }

  bool contains(std::string_view name) const noexcept { return slot(name) != nullptr; }
  template <class T>
  bool contains(const key<T>& k) const noexcept {
    const detail::bag_slot* s = slot(k.name());
    return s != nullptr && s->ops->type == typeid(T);
  }
  bool erase(std::string_view name) noexcept;

  std::size_t size() const noexcept { return slots_.size(); }
  bool empty() const noexcept { return slots_.empty(); }
  // The names held, in insertion order.
  std::vector<std::string> names() const;
  // The stored type of a name (nullptr when absent).
  const std::type_info* type_of(std::string_view name) const noexcept {
    const detail::bag_slot* s = slot(name);
    return s != nullptr ? &s->ops->type : nullptr;
  }

  // Same names, same types, equal values (identical shared values count as equal; values
  // of a type without operator== are equal only when identical).
  friend bool operator==(const bag& a, const bag& b) noexcept;

  // --- for the flow engine ---------------------------------------------------------------
  const detail::bag_slot* slot(std::string_view name) const noexcept {
    for (const auto& s : slots_) {
      if (s.name == name) return &s;
    }
    return nullptr;
  }
  const std::vector<detail::bag_slot>& slots() const noexcept { return slots_; }
  void put(detail::bag_slot s);
  void put(std::string name, std::shared_ptr<const void> value, const detail::value_ops* ops,
           const char* producer = "<initial>") {
    put(detail::bag_slot{std::move(name), std::move(value), ops, producer});
  }
  void reserve(std::size_t n) { slots_.reserve(n); }
  void reset_producers() noexcept {
    for (auto& s : slots_) s.producer = "<initial>";
  }

private:
  std::vector<detail::bag_slot> slots_;
};

}  // namespace ferry::flow
