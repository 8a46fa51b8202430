// Asphalt's mailer: the implementation is chosen by configuration and added under its
// abstract interface too, so consumers look up "some mailer" without knowing which one.
#include <ferry/ferry.hpp>
#include <ferry/flow/context.hpp>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace {

class mailer {
public:
  virtual ~mailer() = default;
  virtual void send(const std::string& to, const std::string& body) = 0;
};

class smtp_mailer final : public mailer {
public:
  explicit smtp_mailer(std::string host) : host_(std::move(host)) {}
  void send(const std::string& to, const std::string& body) override {
    std::printf("  smtp via %s -> %s: %s\n", host_.c_str(), to.c_str(), body.c_str());
  }

private:
  std::string host_;
};

class mock_mailer final : public mailer {
public:
  void send(const std::string& to, const std::string& body) override {
    sent.push_back(to + ": " + body);
    std::printf("  mock mailer recorded -> %s\n", to.c_str());
  }
  std::vector<std::string> sent;
};

// The component reads its configuration and publishes the chosen backend as `mailer`
// (and as its own type, for code that needs the specifics).
void configure_mailer(ferry::flow::context& ctx, const std::string& backend) {
  if (backend == "smtp") {
    ctx.add_resource(std::make_shared<smtp_mailer>("mail.example.org"), "default",
                     ferry::flow::types<mailer, smtp_mailer>);
  } else {
    ctx.add_resource(std::make_shared<mock_mailer>(), "default",
                     ferry::flow::types<mailer, mock_mailer>);
  }
}

// A consumer: only knows the interface.
void notify_signup(const ferry::flow::context& ctx, const std::string& user) {
  ctx.require<mailer>()->send(user, "welcome aboard");
}

}  // namespace

int main() {
  ferry::entrypoint ep;
  return ep.run([&]() -> asio::awaitable<int> {
    for (const char* backend : {"smtp", "mock"}) {
      std::printf("backend = %s\n", backend);
      ferry::flow::context ctx{ep.get_executor()};
      configure_mailer(ctx, backend);
      notify_signup(ctx, "ada@example.org");
      if (auto mock = ctx.get<mock_mailer>()) {
        std::printf("  the test can inspect the mock: %zu message(s)\n", mock->sent.size());
      }
      co_await ctx.close();
    }
    co_return 0;
  });
}
