// aiomisc's "my first blockchain" (the threaded iterator decorator section): a blocking
// generator reads a file line by line, chains an MD5 over the lines (the digest of each line
// covers every line before it) and yields (line, hex digest); the coroutine sends
// "digest\tline" over TCP. Instead of a netcat listener on port 2233, the example runs its
// own listener on 127.0.0.1 (ephemeral port) in the same loop, which recomputes the chain
// and verifies every digest it receives. The file is argv[1], else this source file
// (__FILE__) when it exists, else a built-in text. MD5 is implemented below from RFC 1321
// and checked against known vectors at start-up.
#include <ferry/ferry.hpp>

#include <asio/connect.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/read.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

using namespace asio::experimental::awaitable_operators;
using asio::ip::tcp;

namespace {

// MD5 (RFC 1321), incremental like Python's hashlib.md5: update() any number of times;
// hexdigest() pads a copy, so the running hash can go on.
class md5 {
public:
  void update(std::string_view data) {
    for (const char c : data) {
      block_[length_++ % 64] = static_cast<unsigned char>(c);
      if (length_ % 64 == 0) compress();
    }
  }

  std::string hexdigest() const {
    md5 tail = *this;
    const std::uint64_t bits = length_ * 8;
    tail.update("\x80");
    while (tail.length_ % 64 != 56) tail.update(std::string_view("\0", 1));
    for (int i = 0; i < 8; ++i) tail.update(std::string(1, static_cast<char>(bits >> (8 * i))));
    std::string hex;
    for (const std::uint32_t word : tail.state_) {
      for (int i = 0; i < 4; ++i) {  // little-endian bytes
        hex += "0123456789abcdef"[(word >> (8 * i + 4)) & 0xf];
        hex += "0123456789abcdef"[(word >> (8 * i)) & 0xf];
      }
    }
    return hex;
  }

private:
  void compress() {
    static constexpr int shift[4][4] = {{7, 12, 17, 22}, {5, 9, 14, 20}, {4, 11, 16, 23},
                                        {6, 10, 15, 21}};
    static const std::array<std::uint32_t, 64> sine = [] {  // T[i] = floor(2^32 |sin(i + 1)|)
      std::array<std::uint32_t, 64> t{};
      for (std::size_t i = 0; i < 64; ++i) {
        const double sine_i = std::abs(std::sin(static_cast<double>(i + 1)));
        t[i] = static_cast<std::uint32_t>(std::floor(sine_i * 4294967296.0));
      }
      return t;
    }();
    std::uint32_t m[16];
    for (std::size_t i = 0; i < 16; ++i) {
      m[i] = std::uint32_t{block_[4 * i]} | std::uint32_t{block_[4 * i + 1]} << 8 |
             std::uint32_t{block_[4 * i + 2]} << 16 | std::uint32_t{block_[4 * i + 3]} << 24;
    }
    auto [a, b, c, d] = state_;
    for (std::size_t i = 0; i < 64; ++i) {
      const std::size_t round = i / 16;
      std::uint32_t f = round == 0 ? (b & c) | (~b & d)   // F
                      : round == 1 ? (d & b) | (~d & c)   // G
                      : round == 2 ? b ^ c ^ d            // H
                                   : c ^ (b | ~d);        // I
      const std::size_t g = round == 0 ? i
                          : round == 1 ? (5 * i + 1) % 16
                          : round == 2 ? (3 * i + 5) % 16
                                       : (7 * i) % 16;
      f += a + sine[i] + m[g];
      a = d;
      d = c;
      c = b;
      b += std::rotl(f, shift[round][i % 4]);
    }
    state_[0] += a;
    state_[1] += b;
    state_[2] += c;
    state_[3] += d;
  }

  std::array<std::uint32_t, 4> state_{0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476};
  std::array<unsigned char, 64> block_{};
  std::uint64_t length_ = 0;  // bytes hashed so far
};

void md5_self_test() {
  const std::pair<const char*, const char*> vectors[] = {
      {"", "d41d8cd98f00b204e9800998ecf8427e"},
      {"abc", "900150983cd24fb0d6963f7d28e17f72"},
      {"12345678901234567890123456789012345678901234567890123456789012345678901234567890",
       "57edf4a22be3c955ac49da2e2107b67a"}};  // RFC 1321 A.5, spans two blocks
  for (const auto& [text, expected] : vectors) {
    md5 h;
    h.update(text);
    if (h.hexdigest() != expected) {
      std::fprintf(stderr, "md5 self-test failed for \"%s\"\n", text);
      std::abort();
    }
  }
}

// The seed's first lines: its digests start dc80feba..., 78ec3bcb..., as in the seed's output.
constexpr const char* builtin_text =
    "import asyncio\nimport hashlib\n\nimport aiomisc\n\n# My first blockchain\n";

// The seed's blocking_reader: lines keep their '\n', as Python's `for line in fp` does.
using chained_line = std::pair<std::string, std::string>;  // (line, hex digest so far)
auto blocking_reader = ferry::threaded_iterable(
    [](ferry::sink<chained_line>& out, std::string path) {
      std::ifstream file;
      std::istringstream text(builtin_text);
      if (!path.empty()) file.open(path);
      if (!path.empty() && !file) throw std::runtime_error("cannot open " + path);
      std::istream& in = path.empty() ? static_cast<std::istream&>(text) : file;
      md5 chain;
      for (std::string line; std::getline(in, line);) {
        if (!in.eof()) line += '\n';
        chain.update(line);
        if (!out({std::move(line), chain.hexdigest()})) return;
      }
    });

// The seed's main(): connect, then write digest, '\t', line for every item.
asio::awaitable<std::string> send_chain(tcp::endpoint to, std::string path) {
  tcp::socket socket(co_await asio::this_coro::executor);
  co_await socket.async_connect(to, asio::use_awaitable);
  std::string last_digest;
  co_await ferry::closing(blocking_reader(path), [&](auto& gen) -> asio::awaitable<void> {
    while (auto item = co_await gen.next()) {
      const std::string message = item->second + '\t' + item->first;
      co_await asio::async_write(socket, asio::buffer(message), asio::use_awaitable);
      last_digest = item->second;
    }
  });
  socket.shutdown(tcp::socket::shutdown_send);  // EOF for the listener
  co_return last_digest;
}

// The netcat stand-in: one connection, read to EOF.
asio::awaitable<std::string> listen_once(tcp::acceptor& acceptor) {
  tcp::socket peer = co_await acceptor.async_accept(asio::use_awaitable);
  std::string received;
  auto [ec, n] = co_await asio::async_read(peer, asio::dynamic_buffer(received),
                                           asio::experimental::as_tuple(asio::use_awaitable));
  if (ec != asio::error::eof) throw std::system_error(ec, "listener read");
  std::printf("listener: connection from %s, %zu bytes\n",
              peer.remote_endpoint().address().to_string().c_str(), n);
  co_return received;
}

}  // namespace

int main(int argc, char** argv) {
  md5_self_test();
  std::string path = argc > 1 ? argv[1] : (std::filesystem::exists(__FILE__) ? __FILE__ : "");
  if (!path.empty() && !std::ifstream(path)) {
    std::fprintf(stderr, "cannot open %s\n", path.c_str());
    return 2;
  }
  std::printf("reading %s\n", path.empty() ? "the built-in text" : path.c_str());

  ferry::entrypoint ep{{.pool_size = 2}};
  return ep.run([&]() -> asio::awaitable<int> {
    tcp::acceptor acceptor(co_await asio::this_coro::executor,
                           tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
    auto [received, sent_digest] =
        co_await (listen_once(acceptor) && send_chain(acceptor.local_endpoint(), path));

    // Verify: recompute the chain over the received lines and compare every digest.
    md5 chain;
    std::size_t lines = 0;
    std::string last;
    for (std::size_t pos = 0; pos < received.size(); ++lines) {
      const std::size_t tab = received.find('\t', pos);
      std::size_t end = received.find('\n', tab);
      end = end == std::string::npos ? received.size() : end + 1;
      const std::string digest = received.substr(pos, tab - pos);
      const std::string line = received.substr(tab + 1, end - tab - 1);
      chain.update(line);
      last = chain.hexdigest();
      if (digest != last) {
        std::printf("line %zu: digest mismatch\n", lines + 1);
        co_return 1;
      }
      if (lines < 4) {
        std::printf("  %s\t%s\n", digest.c_str(), line.substr(0, line.find('\n')).c_str());
      }
      pos = end;
    }
    std::printf("  ...\n%zu lines, every digest verified; last %s (%s)\n", lines, last.c_str(),
                last == sent_digest ? "matches the sender's" : "DIFFERS from the sender's");
    co_return last == sent_digest ? 0 : 1;
  });
}
