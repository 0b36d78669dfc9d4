#include "server/metrics.h"

#include <charconv>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"

namespace needle::server {
namespace {

// A label value with \, " and newline escaped as the format requires.
std::string Escape(const std::string& v) {
  return absl::StrReplaceAll(v, {{"\\", "\\\\"}, {"\"", "\\\""}, {"\n", "\\n"}});
}

// Sample values: integers exactly; other values in the shortest form that reads back the same double.
std::string Value(int64_t v) { return absl::StrCat(v); }
std::string Value(double v) {
  char buf[32];
  const std::to_chars_result r = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, r.ptr);
}

class Writer {
 public:
  void Family(const char* name, const char* type, const char* help) {
    absl::StrAppend(&out_, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
  }
  template <class T>
  void Sample(const std::string& name, const std::string& labels, T value) {
    absl::StrAppend(&out_, name, labels.empty() ? "" : absl::StrCat("{", labels, "}"), " ", Value(value), "\n");
  }
  void Histogram(const char* name, const char* help, const engine::LatencyHistogram& h) {
    Family(name, "histogram", help);
    int64_t cumulative = 0;
    for (size_t i = 0; i < h.kBounds.size(); ++i) {
      cumulative += h.buckets[i];
      Sample(absl::StrCat(name, "_bucket"), absl::StrFormat("le=\"%g\"", h.kBounds[i]), cumulative);
    }
    cumulative += h.buckets[h.kBounds.size()];
    Sample(absl::StrCat(name, "_bucket"), "le=\"+Inf\"", cumulative);
    Sample(absl::StrCat(name, "_sum"), "", h.sum);
    Sample(absl::StrCat(name, "_count"), "", h.count);
  }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

}  // namespace

std::string RenderMetrics(const MetricsInfo& info, const engine::EngineStats* stats) {
  Writer w;
  w.Family("needle_model_info", "gauge", "The served model and backend (always 1).");
  w.Sample("needle_model_info", absl::StrCat("model=\"", Escape(info.model), "\",backend=\"", Escape(info.backend), "\""),
           int64_t{1});
  w.Family("needle_engine_loaded", "gauge", "1 once the engine is built and warmed up.");
  w.Sample("needle_engine_loaded", "", int64_t{stats != nullptr ? 1 : 0});
  if (stats == nullptr) return w.Take();
  const engine::EngineStats& s = *stats;
  const engine::EngineMetrics& m = s.metrics;

  w.Family("needle_healthy", "gauge", "0 after an executor failure (the server then refuses new requests).");
  w.Sample("needle_healthy", "", int64_t{s.healthy ? 1 : 0});
  w.Family("needle_draining", "gauge", "1 while shutting down (new requests get UNAVAILABLE).");
  w.Sample("needle_draining", "", int64_t{s.draining ? 1 : 0});
  w.Family("needle_requests_running", "gauge", "Requests admitted and not ended (prefilling or decoding).");
  w.Sample("needle_requests_running", "", s.running);
  w.Family("needle_requests_waiting", "gauge", "Requests queued for admission.");
  w.Sample("needle_requests_waiting", "", s.waiting);
  w.Family("needle_requests_total", "counter",
           "Requests by outcome: finished (STOP, LENGTH or EOS), cancelled (client or deadline), failed (engine "
           "error), refused (rejected at submission).");
  w.Sample("needle_requests_total", "outcome=\"finished\"", s.finished);
  w.Sample("needle_requests_total", "outcome=\"cancelled\"", s.cancelled);
  w.Sample("needle_requests_total", "outcome=\"failed\"", s.failed);
  w.Sample("needle_requests_total", "outcome=\"refused\"", s.refused);
  w.Family("needle_preemptions_total", "counter", "Sequences preempted (admission reserves whole sequences: 0).");
  w.Sample("needle_preemptions_total", "", s.preempted);
  w.Family("needle_engine_steps_total", "counter", "Engine steps run.");
  w.Sample("needle_engine_steps_total", "", s.steps);
  w.Family("needle_prompt_tokens_total", "counter", "Prompt tokens of requests whose prefill completed.");
  w.Sample("needle_prompt_tokens_total", "", m.prompt_tokens);
  w.Family("needle_generation_tokens_total", "counter", "Tokens generated.");
  w.Sample("needle_generation_tokens_total", "", m.generation_tokens);

  w.Family("needle_kv_cache_pages", "gauge", "KV cache pages (slots for the staging pool) by pool and state.");
  for (const engine::PoolStats& p : s.pools) {
    if (!p.present) continue;
    const std::string pool = absl::StrCat("pool=\"", Escape(p.name), "\"");
    w.Sample("needle_kv_cache_pages", absl::StrCat(pool, ",state=\"free\""), p.free);
    w.Sample("needle_kv_cache_pages", absl::StrCat(pool, ",state=\"used\""), p.total - p.free);
  }
  w.Family("needle_kv_cache_usage_ratio", "gauge", "Fraction of each KV cache pool's pages in use.");
  for (const engine::PoolStats& p : s.pools) {
    if (!p.present) continue;
    const double used = p.total > 0 ? static_cast<double>(p.total - p.free) / static_cast<double>(p.total) : 0.0;
    w.Sample("needle_kv_cache_usage_ratio", absl::StrCat("pool=\"", Escape(p.name), "\""), used);
  }

  w.Histogram("needle_queue_time_seconds", "Arrival to admission, per admitted request.", m.queue_time);
  w.Histogram("needle_time_to_first_token_seconds", "Arrival to the first generated token.", m.time_to_first_token);
  w.Histogram("needle_inter_token_latency_seconds", "Between consecutive generated tokens of a request.",
              m.inter_token_latency);
  w.Histogram("needle_request_latency_seconds", "Arrival to the end, per request that finished (STOP, LENGTH, EOS).",
              m.request_latency);
  return w.Take();
}

}  // namespace needle::server
