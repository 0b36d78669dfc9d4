// The server's metrics in the Prometheus text exposition format (version 0.0.4), served on
// GET /metrics by MetricsHttpServer (server/metrics_http.h) when --metrics_listen is set: request
// counts by outcome, running and waiting requests, token totals, KV cache pages per pool, engine
// health, and latency histograms (queue time, time to first token, inter-token latency, request
// latency). Every family is prefixed needle_; docs/api.md lists them.
#pragma once

#include <string>

#include "engine/engine.h"

namespace needle::server {

// What identifies the served model (the labels of needle_model_info).
struct MetricsInfo {
  std::string model;    // as given to --model
  std::string backend;  // as given to --backend
};

// The exposition text for `stats`, or for a server whose engine is not loaded yet (null: only the
// info and needle_engine_loaded 0).
std::string RenderMetrics(const MetricsInfo& info, const engine::EngineStats* stats);

}  // namespace needle::server
