// DFFML's Scrypt operation (operation implementations, "CPU bound operations"): the
// implementation owns a thread pool — created in enter(), the seed's __aenter__, and joined
// in exit() — and each run hashes its password there with scrypt, returning {hashed hex,
// salt hex}. As the seed's TODO asks, the password length is validated first, on the loop
// (refused above 1024 bytes with a clear exception) so a bad input never reaches the pool.
//
// Hashing is OpenSSL's EVP_PBE_scrypt (N = 2^14, r = 8, p = 1, 64-byte key, random 64-byte
// salt from RAND_bytes), checked at start-up against the RFC 7914 test vector. Each
// password is its own run context; the one that is too long fails with
// ferry::flow::operation_error (strict orchestrator) while the others complete. Finally a
// stored hash is verified, through ferry::threaded, against the right and a wrong password.
#include <ferry/ferry.hpp>
#include <ferry/flow/context.hpp>
#include <ferry/flow/orchestrator.hpp>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fl = ferry::flow;

namespace {

constexpr std::uint64_t scrypt_n = std::uint64_t{1} << 14;
constexpr std::uint64_t scrypt_r = 8;
constexpr std::uint64_t scrypt_p = 1;
constexpr std::size_t key_size = 64;
constexpr std::size_t salt_size = 16 * 4;  // the seed's os.urandom(16 * 4)
constexpr std::size_t max_password = 1024;

std::string openssl_error() {
  char text[256] = "unknown error";
  if (const unsigned long code = ERR_get_error()) ERR_error_string_n(code, text, sizeof text);
  return text;
}

std::string to_hex(const unsigned char* p, std::size_t n) {
  std::string hex;
  hex.reserve(2 * n);
  for (std::size_t i = 0; i < n; ++i) {
    hex += "0123456789abcdef"[p[i] >> 4];
    hex += "0123456789abcdef"[p[i] & 0xf];
  }
  return hex;
}

std::vector<unsigned char> from_hex(std::string_view hex) {
  auto nibble = [](char c) {
    return static_cast<unsigned char>(c <= '9' ? c - '0' : c - 'a' + 10);
  };
  std::vector<unsigned char> out(hex.size() / 2);
  for (std::size_t i = 0; i < out.size(); ++i) {
    out[i] = static_cast<unsigned char>(nibble(hex[2 * i]) << 4 | nibble(hex[2 * i + 1]));
  }
  return out;
}

// scrypt(password, salt) as a 64-byte key. Blocking: tens of milliseconds of CPU.
std::array<unsigned char, key_size> scrypt(std::string_view password, const unsigned char* salt,
                                           std::size_t salt_len) {
  std::array<unsigned char, key_size> key{};
  if (EVP_PBE_scrypt(password.data(), password.size(), salt, salt_len, scrypt_n, scrypt_r, scrypt_p,
                     0, key.data(), key.size()) != 1) {
    throw std::runtime_error("EVP_PBE_scrypt failed: " + openssl_error());
  }
  return key;
}

// RFC 7914 section 12, the vector with these very parameters.
void scrypt_self_test() {
  const std::string_view salt = "SodiumChloride";
  const auto key = scrypt("pleaseletmein", reinterpret_cast<const unsigned char*>(salt.data()), salt.size());
  const std::string expected =
      "7023bdcb3afd7348461c06cd81fd38ebfda8fbba904f8e3ea9b543f6545da1f2"
      "d5432955613f0fcf62d49705242a9af9e61e85dc0d651e40dfcf017b45575887";
  if (to_hex(key.data(), key.size()) != expected) {
    std::fprintf(stderr, "scrypt self-test failed (RFC 7914 vector)\n");
    std::abort();
  }
}

// The seed's ScryptPassword.
struct scrypt_password {
  std::string hashed{};  // hex of the 64-byte key
  std::string salt{};    // hex of the 64-byte salt
};

// The seed's ScryptContext.hash_password: runs on a worker of the implementation's pool.
scrypt_password hash_password(const std::string& password) {
  std::array<unsigned char, salt_size> salt{};
  if (RAND_bytes(salt.data(), static_cast<int>(salt.size())) != 1) {
    throw std::runtime_error("RAND_bytes failed: " + openssl_error());
  }
  const auto key = scrypt(password, salt.data(), salt.size());
  return {to_hex(key.data(), key.size()), to_hex(salt.data(), salt.size())};
}

bool verify_password(const std::string& password, const scrypt_password& stored) {
  const std::vector<unsigned char> salt = from_hex(stored.salt);
  const std::vector<unsigned char> expected = from_hex(stored.hashed);
  const auto key = scrypt(password, salt.data(), salt.size());
  return expected.size() == key.size() && CRYPTO_memcmp(key.data(), expected.data(), key.size()) == 0;
}

// The seed's Scrypt: one per orchestrator (per operation instance).
class scrypt_impl {
public:
  // The seed's __aenter__: the pool exists from before the first run until exit().
  void enter(fl::context&) {
    pool_ = std::make_unique<ferry::thread_pool>(ferry::thread_pool_options{.threads = 2, .name = "scrypt"});
    std::printf("  [scrypt] enter: own pool of %zu threads started\n", pool_->stats().threads);
  }

  // The seed's __aexit__.
  void exit(std::exception_ptr) {
    pool_->join();
    const ferry::thread_pool_stats s = pool_->stats();
    std::printf("  [scrypt] exit: pool joined after %llu hash(es) submitted, %llu completed\n",
                static_cast<unsigned long long>(s.submitted), static_cast<unsigned long long>(s.completed));
    pool_.reset();
  }

  // The seed's ScryptContext.run. A coroutine, so it runs on the loop: validate there, then
  // offload the hashing to the implementation's own pool.
  asio::awaitable<scrypt_password> operator()(std::string password) {
    if (password.size() > max_password) {
      throw std::length_error("password is " + std::to_string(password.size()) +
                              " bytes; scrypt accepts at most " + std::to_string(max_password));
    }
    auto hash = ferry::threaded(*pool_, hash_password);
    auto op = hash(std::move(password));
    co_return co_await std::move(op);
  }

private:
  std::unique_ptr<ferry::thread_pool> pool_;
};

std::string message_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "<not a std::exception>";
  }
}

}  // namespace

int main() {
  scrypt_self_test();
  std::printf("scrypt self-test passed (RFC 7914, N=%llu r=%llu p=%llu)\n",
              static_cast<unsigned long long>(scrypt_n), static_cast<unsigned long long>(scrypt_r),
              static_cast<unsigned long long>(scrypt_p));

  const fl::definition<std::string> unhashed{"unhashed_password"};
  const fl::definition<scrypt_password> hashed{"scrypt_password"};
  const fl::operation scrypt_op =
      fl::make_operation("scrypt").inputs(unhashed).outputs(hashed).implement<scrypt_impl>();
  const fl::output<scrypt_password> result = fl::get_single(hashed);
  const fl::dataflow flow{{scrypt_op}, {result}, {.seeds = {unhashed}}};

  const std::vector<std::pair<std::string, std::string>> passwords = {
      {"short", "hunter2"},
      {"phrase", "correct horse battery staple"},
      {"max-1024", std::string(max_password, 'a')},
      {"too-long", std::string(max_password + 1, 'b')},
  };

  ferry::entrypoint ep{{.pool_size = 2}};
  auto main_task = [&]() -> asio::awaitable<int> {
    fl::context scope{ep.get_executor()};
    fl::orchestrator orch{scope, fl::orchestrator_options{.strict = true}};
    std::vector<fl::input_set> sets;
    for (const auto& [name, password] : passwords) {
      sets.emplace_back(name, std::vector{fl::seed(unhashed, password)});
    }
    std::printf("hashing %zu passwords, one run context each:\n", sets.size());
    auto run_op = orch.run(flow, std::move(sets));
    std::vector<fl::context_result> done = co_await std::move(run_op);

    std::map<std::string, const fl::context_result*> by_name;
    for (const auto& r : done) by_name[r.name] = &r;
    int failures = 0;
    for (const auto& [name, password] : passwords) {
      const fl::context_result& r = *by_name.at(name);
      if (r.ok()) {
        const scrypt_password& p = r[result];
        std::printf("  %-9s %4zu bytes -> hashed %.16s... (%zu hex)  salt %.16s... (%zu hex)\n",
                    name.c_str(), password.size(), p.hashed.c_str(), p.hashed.size(), p.salt.c_str(),
                    p.salt.size());
        continue;
      }
      ++failures;
      try {
        r.rethrow_if_failed();
      } catch (const fl::operation_error& e) {
        std::printf("  %-9s %4zu bytes -> operation_error in '%s': %s\n", name.c_str(), password.size(),
                    e.instance().c_str(), e.what());
        std::printf("  %-9s            cause: %s\n", "", message_of(e.cause()).c_str());
      }
    }

    // Check a stored hash the way a login would: scrypt again with the stored salt.
    const scrypt_password stored = by_name.at("phrase")->results[result];
    auto verify = ferry::threaded(verify_password);
    auto right_op = verify(std::string("correct horse battery staple"), stored);
    const bool right = co_await std::move(right_op);
    auto wrong_op = verify(std::string("correct horse battery stapler"), stored);
    const bool wrong = co_await std::move(wrong_op);
    std::printf("verify 'phrase' with its password: %s; with a wrong one: %s\n",
                right ? "match" : "NO MATCH", wrong ? "MATCH" : "no match");

    std::printf("closing the orchestrator:\n");
    auto close_op = orch.close();
    co_await std::move(close_op);
    auto close_scope = scope.close();
    co_await std::move(close_scope);
    co_return failures == 1 && right && !wrong ? 0 : 1;
  };
  return ep.run(main_task);
}
