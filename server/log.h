// The server's logger: spdlog's "server" logger (main.cc registers it with the process's sinks), or
// a clone of the default logger under that name where nothing registered it (tests, embedders).
#pragma once

#include <memory>

#include "spdlog/spdlog.h"

namespace needle::server {

std::shared_ptr<spdlog::logger> Log();

}  // namespace needle::server
