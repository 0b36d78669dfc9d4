// Child processes for the e2e tests. See subprocess.h.
#include "tests/e2e/subprocess.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "grpc/health/v1/health.grpc.pb.h"

extern char** environ;

namespace needle::e2e {

using Clock = std::chrono::steady_clock;

std::unique_ptr<Subprocess> Subprocess::Spawn(const std::vector<std::string>& argv, std::string* error,
                                              bool merge_stderr) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    *error = std::string("pipe: ") + std::strerror(errno);
    return nullptr;
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  if (merge_stderr) posix_spawn_file_actions_adddup2(&actions, fds[1], STDERR_FILENO);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    *error = "posix_spawn " + argv[0] + ": " + std::strerror(rc);
    return nullptr;
  }
  return std::unique_ptr<Subprocess>(new Subprocess(pid, fds[0]));
}

Subprocess::~Subprocess() {
  if (!exited_) {
    kill(pid_, SIGKILL);
    Wait(std::chrono::seconds(10));
  }
  close(stdout_fd_);
}

bool Subprocess::ReadMore(Clock::time_point deadline) {
  if (eof_) return false;
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  if (left <= 0) return false;
  pollfd p{stdout_fd_, POLLIN, 0};
  const int ready = poll(&p, 1, static_cast<int>(left));
  if (ready <= 0) return false;
  char buf[4096];
  const ssize_t n = read(stdout_fd_, buf, sizeof(buf));
  if (n <= 0) {
    eof_ = true;
    return false;
  }
  buffer_.append(buf, static_cast<size_t>(n));
  return true;
}

std::optional<std::string> Subprocess::ReadLine(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (size_t nl = buffer_.find('\n'); nl != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      return line;
    }
    if (!ReadMore(deadline)) return std::nullopt;
  }
}

std::string Subprocess::ReadAll(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (ReadMore(deadline)) {
  }
  std::string out;
  out.swap(buffer_);
  return out;
}

void Subprocess::Signal(int signal) {
  if (!exited_) kill(pid_, signal);
}

int Subprocess::Wait(std::chrono::milliseconds timeout) {
  if (exited_) return exit_code_;
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    int status = 0;
    const pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      exited_ = true;
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      return exit_code_;
    }
    if (Clock::now() >= deadline) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

std::unique_ptr<ServerProcess> ServerProcess::Start(const std::vector<std::string>& args, std::string* error) {
  std::vector<std::string> argv = {NEEDLE_SERVER_PATH, "--listen=127.0.0.1:0"};
  argv.insert(argv.end(), args.begin(), args.end());
  std::unique_ptr<ServerProcess> s(new ServerProcess);
  s->process_ = Subprocess::Spawn(argv, error);
  if (!s->process_) return nullptr;
  const std::string prefix = "needle-server listening on ";
  const std::string metrics_prefix = "needle-server metrics on http://";
  for (;;) {
    std::optional<std::string> line = s->process_->ReadLine(std::chrono::seconds(30));
    if (!line) {
      *error = "needle-server did not report its port within 30 s (exit code " +
               std::to_string(s->process_->Wait(std::chrono::milliseconds(100))) + ")";
      return nullptr;
    }
    if (line->rfind(prefix, 0) == 0) {
      s->address_ = line->substr(prefix.size());
      break;
    }
    if (line->rfind(metrics_prefix, 0) == 0) {
      const std::string rest = line->substr(metrics_prefix.size());
      s->metrics_address_ = rest.substr(0, rest.find('/'));
    }
  }
  s->channel_ = s->NewChannel();
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  std::string health;
  while (Clock::now() < deadline) {
    health = HealthStatus(s->channel_);
    if (health == "SERVING") return s;
    if (!s->process_->running() || s->process_->Wait(std::chrono::milliseconds(0)) >= 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  *error = "needle-server at " + s->address_ + " did not become SERVING (last: " + health + ")";
  return nullptr;
}

std::shared_ptr<grpc::Channel> ServerProcess::NewChannel() const {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection of its own
  args.SetMaxReceiveMessageSize(64 << 20);
  return grpc::CreateCustomChannel(address_, grpc::InsecureChannelCredentials(), args);
}

std::string HttpGet(const std::string& host_port, const std::string& path, int* status) {
  *status = 0;
  const size_t colon = host_port.rfind(':');
  if (colon == std::string::npos) return "no port in " + host_port;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(std::stoi(host_port.substr(colon + 1))));
  if (inet_pton(AF_INET, host_port.substr(0, colon).c_str(), &addr.sin_addr) != 1) return "bad host " + host_port;
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return std::string("socket: ") + std::strerror(errno);
  timeval timeout{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  if (connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    const std::string e = std::string("connect: ") + std::strerror(errno);
    close(fd);
    return e;
  }
  const std::string request = "GET " + path + " HTTP/1.0\r\nHost: " + host_port + "\r\nConnection: close\r\n\r\n";
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return "short write";
  }
  std::string response;
  char buf[4096];
  for (;;) {
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    response.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  const size_t head_end = response.find("\r\n\r\n");
  if (response.rfind("HTTP/1.", 0) != 0 || head_end == std::string::npos || response.size() < 12) {
    return "not an HTTP response: " + response.substr(0, 200);
  }
  *status = std::atoi(response.c_str() + 9);
  return response.substr(head_end + 4);
}

std::string HealthStatus(const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  grpc::health::v1::HealthCheckRequest req;
  grpc::health::v1::HealthCheckResponse resp;
  grpc::Status s = stub->Check(&ctx, req, &resp);
  if (!s.ok()) return "error " + std::to_string(s.error_code()) + ": " + s.error_message();
  return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status());
}

}  // namespace needle::e2e
