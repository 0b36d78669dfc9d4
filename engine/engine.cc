// The engine thread: takes submissions and cancellations from the inbox at step boundaries, asks the
// scheduler for a plan, commits the plan's KV reservations, runs the executor, then samples, checks
// stop conditions and publishes events. See engine/README.md for the contract.
#include "engine/engine.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "engine/sampler.h"
#include "engine/stop_matcher.h"
#include "spdlog/spdlog.h"

namespace needle::engine {

namespace {

std::shared_ptr<spdlog::logger> Log() {
  static std::shared_ptr<spdlog::logger> logger = [] {
    auto l = spdlog::get("engine");
    return l ? l : spdlog::default_logger()->clone("engine");
  }();
  return logger;
}

uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

double Seconds(absl::Duration d) { return absl::ToDoubleSeconds(d); }

constexpr int kMaxTopLogprobs = 20;

}  // namespace

struct Engine::Live {
  Request req;
  EventSink sink;
  SeqId seq = 0;
  std::vector<int32_t> tokens;  // prompt, then generated tokens
  int64_t prompt_len = 0;
  int64_t computed = 0;         // tokens whose K/V is cached
  int64_t reserve = 0;          // tokens reserved at admission
  int64_t max_new = 0;          // generated tokens allowed
  bool admitted = false;
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<Detokenizer> detok;
  std::unique_ptr<StopMatcher> stop;
  absl::Time arrival, admitted_at, prefill_done, first_token, last_token;
  FinishReason cancel = FinishReason::kUnspecified;  // set by Cancel(), applied at the boundary

  int64_t generated() const { return static_cast<int64_t>(tokens.size()) - prompt_len; }
};

absl::Status EngineConfig::Validate() const {
  SchedulerConfig s{max_batch, prefill_chunk, step_token_budget};
  if (absl::Status st = s.Validate(); !st.ok()) return st;
  if (max_queue < 0) return absl::InvalidArgumentError("max_queue must be >= 0");
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(std::shared_ptr<const ModelWeights> weights,
                                                       std::unique_ptr<Executor> executor,
                                                       const KvCacheConfig& cache, const EngineConfig& config) {
  if (!weights || !executor) return absl::InvalidArgumentError("engine needs weights and an executor");
  if (absl::Status s = config.Validate(); !s.ok()) return s;
  if (absl::Status s = cache.Validate(weights->config); !s.ok()) return s;
  std::unique_ptr<Engine> e(new Engine(std::move(weights), std::move(executor), cache, config));
  e->thread_ = std::thread([p = e.get()] { p->Loop(); });
  return e;
}

Engine::Engine(std::shared_ptr<const ModelWeights> weights, std::unique_ptr<Executor> executor,
               const KvCacheConfig& cache, const EngineConfig& config)
    : weights_(std::move(weights)),
      executor_(std::move(executor)),
      cache_config_(cache),
      config_(config),
      tokenizer_(MakeTokenizer(weights_->config)),
      kv_(weights_->config, cache),
      scheduler_(SchedulerConfig{config.max_batch, config.prefill_chunk, config.step_token_budget}) {
  stats_.pools = kv_.Stats();
}

Engine::~Engine() { Stop(); }

absl::StatusOr<std::string> Engine::Submit(Request req, EventSink sink) {
  const ModelConfig& m = weights_->config;
  auto refuse = [&](absl::Status s) -> absl::Status {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.refused;
    return s;
  };
  if (req.prompt.empty()) return refuse(absl::InvalidArgumentError("input: the prompt is empty"));
  for (size_t i = 0; i < req.prompt.size(); ++i) {
    if (req.prompt[i] < 0 || req.prompt[i] >= m.vocab_size) {
      return refuse(absl::InvalidArgumentError(absl::StrCat("input.token_ids[", i, "]: id ", req.prompt[i],
                                                            " is outside the vocabulary [0, ", m.vocab_size, ")")));
    }
  }
  if (absl::Status s = req.sampling.Validate(); !s.ok()) return refuse(s);
  if (absl::Status s = req.stopping.Validate(); !s.ok()) return refuse(s);
  for (int32_t id : req.stopping.stop_token_ids) {
    if (id >= m.vocab_size) {
      return refuse(absl::InvalidArgumentError(
          absl::StrCat("stopping.stop_token_ids: id ", id, " is outside the vocabulary [0, ", m.vocab_size, ")")));
    }
  }
  if (req.top_logprobs < 0 || req.top_logprobs > kMaxTopLogprobs) {
    return refuse(absl::InvalidArgumentError(absl::StrCat("top_logprobs must be in [0, ", kMaxTopLogprobs, "]")));
  }
  const int64_t ctx = m.max_position_embeddings;
  const int64_t prompt = static_cast<int64_t>(req.prompt.size());
  if (prompt >= ctx) {
    return refuse(absl::OutOfRangeError(
        absl::StrCat("the prompt has ", prompt, " tokens; the model's context is ", ctx, " (room for at least one new token is needed)")));
  }
  const int64_t max_new = req.stopping.max_tokens ? *req.stopping.max_tokens : ctx - prompt;
  if (prompt + max_new > ctx) {
    return refuse(absl::OutOfRangeError(absl::StrCat("prompt (", prompt, " tokens) plus stopping.max_tokens (", max_new,
                                                     ") exceeds the model's context of ", ctx, " tokens")));
  }
  const std::vector<int64_t> need = kv_.layout().PagesFor(prompt + max_new);
  for (int p = 0; p < kNumPools; ++p) {
    if (need[p] > cache_config_.num_pages[p]) {
      return refuse(absl::ResourceExhaustedError(absl::StrCat(
          "a sequence of ", prompt + max_new, " tokens needs ", need[p], " ", PoolName(static_cast<Pool>(p)),
          " pages but the pool has only ", cache_config_.num_pages[p], "; lower max_tokens or enlarge the KV cache")));
    }
  }

  auto live = std::make_unique<Live>();
  live->prompt_len = prompt;
  live->reserve = prompt + max_new;
  live->max_new = max_new;
  live->tokens = req.prompt;
  live->sink = std::move(sink);
  live->arrival = absl::Now();
  std::string id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || draining_) {
      ++stats_.refused;
      return absl::UnavailableError("the server is draining and accepts no new requests");
    }
    if (!stats_.healthy) {
      ++stats_.refused;
      return absl::UnavailableError("the engine failed and is not serving");
    }
    if (req.id.empty()) req.id = absl::StrCat("req-", ++id_counter_);
    if (live_ids_.count(req.id)) {
      ++stats_.refused;
      return absl::AlreadyExistsError(absl::StrCat("request_id \"", req.id, "\" is already live"));
    }
    if (static_cast<int64_t>(inbox_.size()) + stats_.waiting >= config_.max_queue) {
      ++stats_.refused;
      return absl::ResourceExhaustedError(absl::StrCat("the queue is full (", config_.max_queue, " waiting requests)"));
    }
    const uint64_t seed = req.sampling.seed ? *req.sampling.seed : Mix(config_.seed ^ Mix(++id_counter_));
    live->sampler = std::make_unique<Sampler>(req.sampling, seed, req.prompt);
    live->detok = std::make_unique<Detokenizer>(tokenizer_.get());
    live->stop = std::make_unique<StopMatcher>(req.stopping.stop);
    id = req.id;
    live->req = std::move(req);
    live_ids_.insert(id);
    inbox_.push_back(std::move(live));
  }
  cv_.notify_one();
  return id;
}

bool Engine::Cancel(const std::string& id, FinishReason reason) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!live_ids_.count(id)) return false;
    cancels_.emplace_back(id, reason);
  }
  cv_.notify_one();
  return true;
}

void Engine::Drain() {
  std::lock_guard<std::mutex> lock(mu_);
  draining_ = true;
  stats_.draining = true;
}

bool Engine::Idle() const {
  std::lock_guard<std::mutex> lock(mu_);
  return live_ids_.empty();
}

void Engine::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    draining_ = true;
  }
  cv_.notify_one();
  if (thread_.joinable()) thread_.join();
}

EngineStats Engine::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void Engine::TakeInbox() {
  std::vector<std::unique_ptr<Live>> inbox;
  std::vector<std::pair<std::string, FinishReason>> cancels;
  {
    std::lock_guard<std::mutex> lock(mu_);
    inbox.swap(inbox_);
    cancels.swap(cancels_);
  }
  for (auto& l : inbox) {
    Live* p = l.get();
    p->seq = static_cast<SeqId>(next_seq_++);
    live_[p->req.id] = std::move(l);
    waiting_.push_back(p);
  }
  for (auto& [id, reason] : cancels) {
    auto it = live_.find(id);
    if (it != live_.end() && it->second->cancel == FinishReason::kUnspecified) it->second->cancel = reason;
  }
}

void Engine::Finish(Live& live, FinishReason reason, absl::Status status, std::string matched_stop) {
  RequestEvent ev;
  ev.kind = RequestEvent::Kind::kFinished;
  ev.request_id = live.req.id;
  ev.reason = reason;
  ev.matched_stop = std::move(matched_stop);
  ev.status = std::move(status);
  ev.usage.prompt_tokens = live.prompt_len;
  ev.usage.completion_tokens = live.generated();
  const absl::Time now = absl::Now();
  const absl::Time admitted = live.admitted ? live.admitted_at : now;
  ev.timings.queue_s = Seconds(admitted - live.arrival);
  if (reason == FinishReason::kStop || reason == FinishReason::kLength || reason == FinishReason::kEos) {
    metrics_.request_latency.Observe(Seconds(now - live.arrival));
  }
  if (live.prefill_done != absl::Time()) ev.timings.prefill_s = Seconds(live.prefill_done - admitted);
  if (live.first_token != absl::Time()) {
    ev.timings.first_token_s = Seconds(live.first_token - live.arrival);
    ev.timings.decode_s = Seconds(now - live.first_token);
  }
  if (live.admitted) kv_.Release(live.seq);
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), &live), waiting_.end());
  running_.erase(std::remove(running_.begin(), running_.end(), &live), running_.end());
  EventSink sink = std::move(live.sink);
  const std::string id = live.req.id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    live_ids_.erase(id);
    switch (reason) {
      case FinishReason::kCancelled:
      case FinishReason::kDeadline: ++stats_.cancelled; break;
      case FinishReason::kError: ++stats_.failed; break;
      default: ++stats_.finished; break;
    }
  }
  live_.erase(id);  // destroys `live`
  if (sink) sink(std::move(ev));
}

void Engine::SampleAndEmit(Live& live, const float* logits) {
  const ModelConfig& m = weights_->config;
  RequestEvent ev;
  ev.kind = RequestEvent::Kind::kTokens;
  ev.request_id = live.req.id;
  TokenLogprob lp;
  const int32_t tok = live.sampler->Sample(logits, m.vocab_size, live.req.return_logprobs ? &lp : nullptr,
                                           live.req.top_logprobs);
  live.sampler->Accept(tok);
  live.tokens.push_back(tok);
  const absl::Time now = absl::Now();
  if (live.first_token == absl::Time()) {
    live.first_token = now;
    metrics_.time_to_first_token.Observe(Seconds(now - live.arrival));
  } else {
    metrics_.inter_token_latency.Observe(Seconds(now - live.last_token));
  }
  live.last_token = now;
  ++metrics_.generation_tokens;
  ev.token_ids.push_back(tok);
  ev.token_times_s.push_back(Seconds(now - live.arrival));
  if (live.req.return_logprobs) ev.logprobs.push_back(std::move(lp));

  FinishReason reason = FinishReason::kUnspecified;
  std::string matched;
  const StoppingCriteria& st = live.req.stopping;
  if (!st.ignore_eos && m.IsEos(tok)) {
    reason = FinishReason::kEos;
  } else if (std::find(st.stop_token_ids.begin(), st.stop_token_ids.end(), tok) != st.stop_token_ids.end()) {
    reason = FinishReason::kStop;
  }
  if (reason == FinishReason::kUnspecified) {
    live.detok->Add(tok);
    StopMatcher::Result r = live.stop->Feed(live.detok->Take());
    ev.text = std::move(r.text);
    if (r.matched) {
      reason = FinishReason::kStop;
      matched = std::move(r.stop);
    }
  }
  if (reason == FinishReason::kUnspecified &&
      (live.generated() >= live.max_new || static_cast<int64_t>(live.tokens.size()) >= m.max_position_embeddings)) {
    reason = FinishReason::kLength;
  }
  if (reason != FinishReason::kUnspecified && matched.empty() && !live.stop->stopped()) {
    // Generation ends without a stop string so far: release what the detokenizer and the matcher
    // still hold (the flushed bytes can still complete a stop string).
    StopMatcher::Result r = live.stop->Feed(live.detok->Flush());
    ev.text += r.text;
    if (r.matched) {
      reason = FinishReason::kStop;
      matched = std::move(r.stop);
    } else {
      ev.text += live.stop->Flush();
    }
  }
  live.sink(std::move(ev));
  if (reason != FinishReason::kUnspecified) Finish(live, reason, absl::OkStatus(), std::move(matched));
}

}  // namespace needle::engine

namespace needle::engine {

void Engine::Loop() {
  absl::Time last_log = absl::Now();
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !inbox_.empty() || !cancels_.empty() || !live_.empty(); });
      if (stopping_) break;
    }
    TakeInbox();
    // Cancellations and deadlines, observed at the step boundary.
    const absl::Time now = absl::Now();
    std::vector<Live*> ending;
    for (auto& [id, l] : live_) {
      if (l->cancel != FinishReason::kUnspecified || now >= l->req.deadline) ending.push_back(l.get());
    }
    for (Live* l : ending) {
      if (l->cancel == FinishReason::kCancelled) {
        Finish(*l, FinishReason::kCancelled, absl::CancelledError("the request was cancelled"));
      } else {
        Finish(*l, FinishReason::kDeadline, absl::DeadlineExceededError("the request's deadline passed"));
      }
    }
    if (!live_.empty()) RunStep();
    PublishStats();
    if (config_.stats_log_interval_s > 0 && Seconds(absl::Now() - last_log) >= config_.stats_log_interval_s) {
      last_log = absl::Now();
      EngineStats s = Stats();
      Log()->info("running {} waiting {} finished {} cancelled {} refused {} steps {}", s.running, s.waiting,
                  s.finished, s.cancelled, s.refused, s.steps);
    }
  }
  // Stopping: everything still live ends as cancelled.
  TakeInbox();
  std::vector<Live*> rest;
  for (auto& [id, l] : live_) rest.push_back(l.get());
  for (Live* l : rest) Finish(*l, FinishReason::kCancelled, absl::UnavailableError("the server is shutting down"));
  PublishStats();
}

bool Engine::RunStep() {
  ScheduleInput in;
  in.layout = &kv_.layout();
  for (int p = 0; p < kNumPools; ++p) in.free_pages[p] = kv_.FreePages(static_cast<Pool>(p));
  for (Live* l : running_) {
    in.running.push_back({l->seq, static_cast<int64_t>(l->tokens.size()), l->computed, l->reserve});
  }
  for (Live* l : waiting_) {
    in.waiting.push_back({l->seq, static_cast<int64_t>(l->tokens.size()), l->computed, l->reserve});
  }
  Schedule sched = scheduler_.Plan(in);
  if (sched.chunks.empty()) return false;

  std::unordered_map<SeqId, Live*> by_seq;
  for (auto& [id, l] : live_) by_seq[l->seq] = l.get();
  // Admission: reserve the whole sequence. The scheduler checked the pages, so Plan cannot fail.
  for (SeqId seq : sched.admit) {
    Live* l = by_seq.at(seq);
    absl::StatusOr<Reservation> r = kv_.Plan(seq, l->reserve);
    if (!r.ok()) {
      Log()->error("request {}: reservation failed after admission: {}", l->req.id, r.status().ToString());
      Finish(*l, FinishReason::kError, absl::InternalError(std::string(r.status().message())));
      by_seq.erase(seq);
      continue;
    }
    kv_.Commit(*r);
    l->admitted = true;
    l->admitted_at = absl::Now();
    metrics_.queue_time.Observe(Seconds(l->admitted_at - l->arrival));
    waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), l), waiting_.end());
    running_.push_back(l);
  }

  StepPlan plan;
  std::vector<Live*> members;
  for (const ScheduledChunk& c : sched.chunks) {
    auto it = by_seq.find(c.seq);
    if (it == by_seq.end()) continue;
    Live* l = it->second;
    SeqStep s;
    s.seq = c.seq;
    s.start_pos = c.start;
    s.tokens.assign(l->tokens.begin() + c.start, l->tokens.begin() + c.start + c.len);
    s.pages = &kv_.Pages(c.seq);
    plan.seqs.push_back(std::move(s));
    members.push_back(l);
  }
  StepOutput out;
  absl::Status st = executor_->Run(plan, &out);
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.steps;
  }
  if (!st.ok()) {
    Log()->error("executor {} failed: {}; failing {} requests and marking the engine unhealthy", executor_->name(),
                 st.ToString(), members.size());
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.healthy = false;
    }
    for (Live* l : members) {
      Finish(*l, FinishReason::kError, absl::InternalError(absl::StrCat("executor failure: ", st.message())));
    }
    return true;
  }
  for (size_t i = 0; i < members.size(); ++i) {
    Live* l = members[i];
    l->computed += static_cast<int64_t>(plan.seqs[i].tokens.size());
    if (l->computed < static_cast<int64_t>(l->tokens.size())) {
      RequestEvent ev;  // the prompt is not finished: report progress
      ev.kind = RequestEvent::Kind::kPrefillProgress;
      ev.request_id = l->req.id;
      ev.prefilled_tokens = l->computed;
      ev.prompt_tokens = l->prompt_len;
      l->sink(std::move(ev));
      continue;
    }
    if (l->prefill_done == absl::Time()) {
      l->prefill_done = absl::Now();
      metrics_.prompt_tokens += l->prompt_len;
    }
    SampleAndEmit(*l, out.LastRow(i, plan));
  }
  return true;
}

void Engine::PublishStats() {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.running = static_cast<int64_t>(running_.size());
  stats_.waiting = static_cast<int64_t>(waiting_.size());
  stats_.pools = kv_.Stats();
  stats_.metrics = metrics_;
}

}  // namespace needle::engine
