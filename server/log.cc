#include "server/log.h"

namespace needle::server {

std::shared_ptr<spdlog::logger> Log() {
  static std::shared_ptr<spdlog::logger> logger = [] {
    auto l = spdlog::get("server");
    return l ? l : spdlog::default_logger()->clone("server");
  }();
  return logger;
}

}  // namespace needle::server
