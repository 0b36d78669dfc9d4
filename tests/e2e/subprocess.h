// Test support: child processes for the e2e tests. Subprocess spawns a program (posix_spawn, safe in
// a multi-threaded gtest process) with its stdout on a pipe; ServerProcess starts `needle-server`
// on 127.0.0.1:0, reads the bound port from its "needle-server listening on HOST:PORT" line (and the
// metrics endpoint's from the line before it, with --metrics_listen) and waits for grpc.health.v1 to
// report SERVING. HttpGet fetches a page over plain HTTP (the metrics endpoint). Destructors kill
// what is still running.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"

namespace needle::e2e {

class Subprocess {
 public:
  // Starts `argv[0]` with `argv`; stdout goes to a pipe this object reads, stderr is inherited
  // (or goes to the same pipe when `merge_stderr`).
  static std::unique_ptr<Subprocess> Spawn(const std::vector<std::string>& argv, std::string* error,
                                           bool merge_stderr = false);
  ~Subprocess();

  pid_t pid() const { return pid_; }
  // The next stdout line (without '\n'), or nullopt on EOF or timeout.
  std::optional<std::string> ReadLine(std::chrono::milliseconds timeout);
  // Everything up to EOF (or the timeout).
  std::string ReadAll(std::chrono::milliseconds timeout);
  void Signal(int signal);
  // The exit code once the process exits (-1 on timeout, 128 + n when killed by signal n).
  int Wait(std::chrono::milliseconds timeout);
  bool running() const { return !exited_; }

 private:
  Subprocess(pid_t pid, int stdout_fd) : pid_(pid), stdout_fd_(stdout_fd) {}
  bool ReadMore(std::chrono::steady_clock::time_point deadline);

  pid_t pid_;
  int stdout_fd_;
  std::string buffer_;
  bool eof_ = false;
  bool exited_ = false;
  int exit_code_ = -1;
};

class ServerProcess {
 public:
  // Starts needle-server with the demo model (unless `args` names another) on 127.0.0.1:0 plus
  // `args`, and waits until it is SERVING. Returns null and sets `error` on failure.
  static std::unique_ptr<ServerProcess> Start(const std::vector<std::string>& args, std::string* error);

  const std::string& address() const { return address_; }
  // "host:port" of GET /metrics; empty unless started with --metrics_listen.
  const std::string& metrics_address() const { return metrics_address_; }
  std::shared_ptr<grpc::Channel> NewChannel() const;  // a fresh connection
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  Subprocess& process() { return *process_; }

 private:
  std::unique_ptr<Subprocess> process_;
  std::string address_;
  std::string metrics_address_;
  std::shared_ptr<grpc::Channel> channel_;
};

// GET `path` from an HTTP server at "host:port" (IPv4) with HTTP/1.0: *status gets the response's
// status code and the body is returned; on a connection or protocol error *status is 0 and the body
// says what failed.
std::string HttpGet(const std::string& host_port, const std::string& path, int* status);

// The health status ("SERVING", "NOT_SERVING", ...) of the server as a whole, or the RPC error.
std::string HealthStatus(const std::shared_ptr<grpc::Channel>& channel);

}  // namespace needle::e2e
