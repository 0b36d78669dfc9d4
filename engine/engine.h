// Engine: one thread that owns the scheduler, the KV cache manager and the executor, and turns
// submitted requests into streams of token events. RPC threads only call Submit/Cancel/Stats/Drain,
// which touch a mutex-protected inbox; no lock is held across a step. Contract: engine/README.md.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/executor.h"
#include "engine/kv_cache.h"
#include "engine/metrics.h"
#include "engine/request.h"
#include "engine/scheduler.h"
#include "engine/tokenizer.h"
#include "engine/weights.h"

namespace needle::engine {

struct EngineConfig {
  int max_batch = 32;              // running sequences at most
  int prefill_chunk = 512;         // prompt tokens per sequence per step at most
  int step_token_budget = 2048;    // tokens per step (decodes count 1 each) at most
  int max_queue = 1024;            // waiting requests at most; more get RESOURCE_EXHAUSTED
  uint64_t seed = 0;               // seeds requests that don't set one
  double stats_log_interval_s = 10;  // periodic one-line summary (0 = off)

  absl::Status Validate() const;
};

struct EngineStats {
  int64_t running = 0;
  int64_t waiting = 0;
  std::vector<PoolStats> pools;
  int64_t finished = 0;   // ended with STOP, LENGTH or EOS
  int64_t cancelled = 0;  // ended with CANCELLED or DEADLINE
  int64_t refused = 0;    // Submit() returned an error
  int64_t preempted = 0;  // always 0: admission reserves the whole sequence (engine/README.md)
  int64_t failed = 0;     // ended with an executor error
  int64_t steps = 0;
  bool healthy = true;    // false after an executor failure
  bool draining = false;
  EngineMetrics metrics;  // token totals and latency histograms (published at step boundaries)
};

class Engine {
 public:
  // Takes ownership of the executor; `cache` must be the configuration the executor was built with
  // (the executor may hold references into `weights`, which the engine keeps alive). Starts the
  // engine thread.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(std::shared_ptr<const ModelWeights> weights,
                                                        std::unique_ptr<Executor> executor,
                                                        const KvCacheConfig& cache, const EngineConfig& config);
  ~Engine();  // Stop()s

  // Validates and enqueues. Errors: INVALID_ARGUMENT (names the field), OUT_OF_RANGE (prompt plus
  // max_tokens over the context), ALREADY_EXISTS (id of a live request), RESOURCE_EXHAUSTED (queue
  // full, or a request no empty cache could ever hold), UNAVAILABLE (draining or stopped).
  // On success `sink` receives the request's events, the last being kFinished. Returns the id.
  absl::StatusOr<std::string> Submit(Request request, EventSink sink);
  // Ends a live request at the next step boundary with `reason` (kCancelled or kDeadline); its pages
  // return to their pools. Unknown or finished ids are ignored (idempotent). Returns whether it was live.
  bool Cancel(const std::string& id, FinishReason reason = FinishReason::kCancelled);
  // New requests get UNAVAILABLE from now on; live ones continue.
  void Drain();
  // Whether no request is live (waiting or running).
  bool Idle() const;
  // Cancels everything live and joins the engine thread.
  void Stop();

  EngineStats Stats() const;
  const ModelConfig& model() const { return weights_->config; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const KvCacheConfig& cache_config() const { return cache_config_; }

 private:
  struct Live;  // a request inside the engine (engine.cc)

  Engine(std::shared_ptr<const ModelWeights> weights, std::unique_ptr<Executor> executor,
         const KvCacheConfig& cache, const EngineConfig& config);
  void Loop();
  void TakeInbox();
  bool RunStep();
  void Finish(Live& live, FinishReason reason, absl::Status status, std::string matched_stop = "");
  void SampleAndEmit(Live& live, const float* logits);
  void PublishStats();

  std::shared_ptr<const ModelWeights> weights_;
  std::unique_ptr<Executor> executor_;
  KvCacheConfig cache_config_;
  EngineConfig config_;
  std::unique_ptr<Tokenizer> tokenizer_;
  KvCacheManager kv_;
  Scheduler scheduler_;

  // Engine-thread state.
  std::unordered_map<std::string, std::unique_ptr<Live>> live_;
  std::deque<Live*> waiting_;
  std::vector<Live*> running_;
  uint64_t next_seq_ = 1;

  // Shared with RPC threads.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Live>> inbox_;
  std::vector<std::pair<std::string, FinishReason>> cancels_;
  std::unordered_set<std::string> live_ids_;  // ids accepted and not yet finished
  EngineStats stats_;                          // published after every step
  EngineMetrics metrics_;                      // engine thread; copied into stats_ by PublishStats
  bool draining_ = false;
  bool stopping_ = false;
  uint64_t id_counter_ = 0;
  std::thread thread_;
};

}  // namespace needle::engine
