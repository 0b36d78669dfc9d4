// Scripted multi-step scenarios: the real Scheduler and KvCacheManager driven step by step by a tiny
// simulated engine (commit admissions, advance computed tokens, "sample" when a sequence's known
// tokens are all cached, release when max_new is reached), checking the expected plan at each step.
#include "engine/scheduler.h"

#include <gtest/gtest.h>

#include <map>

#include "engine/kv_cache.h"

namespace needle::engine {
namespace {

ModelConfig TinyDense() {
  ModelConfig m;
  m.arch = Architecture::kLlama;
  m.vocab_size = 16;
  m.hidden_size = 8;
  m.num_layers = 1;
  m.num_heads = 2;
  m.num_kv_heads = 1;
  m.head_dim_qk = m.head_dim_v = 4;
  m.intermediate_size = 8;
  m.max_position_embeddings = 4096;
  return m;
}

struct SimSeq {
  int64_t prompt, max_new, num_tokens, computed = 0;
  bool admitted = false, done = false;
};

class Sim {
 public:
  Sim(const SchedulerConfig& sc, int64_t sel_pages) : sched_(sc) {
    KvCacheConfig kc;
    kc.page_tokens = 64;
    kc.num_pages[0] = sel_pages;
    kv_ = std::make_unique<KvCacheManager>(TinyDense(), kc);
  }
  void Add(SeqId id, int64_t prompt, int64_t max_new) {
    seqs_[id] = SimSeq{prompt, max_new, prompt};
    order_.push_back(id);
  }
  Schedule Step() {
    ScheduleInput in;
    in.layout = &kv_->layout();
    for (int p = 0; p < kNumPools; ++p) in.free_pages[p] = kv_->FreePages(static_cast<Pool>(p));
    for (SeqId id : running_) {
      const SimSeq& s = seqs_[id];
      in.running.push_back({id, s.num_tokens, s.computed, s.prompt + s.max_new});
    }
    for (SeqId id : order_) {
      const SimSeq& s = seqs_[id];
      if (!s.admitted && !s.done) in.waiting.push_back({id, s.num_tokens, s.computed, s.prompt + s.max_new});
    }
    Schedule plan = sched_.Plan(in);
    for (SeqId id : plan.admit) {
      auto r = kv_->Plan(id, seqs_[id].prompt + seqs_[id].max_new);
      EXPECT_TRUE(r.ok()) << "admitted " << id << " but " << r.status();
      kv_->Commit(*r);
      seqs_[id].admitted = true;
      running_.push_back(id);
    }
    for (const ScheduledChunk& c : plan.chunks) {
      SimSeq& s = seqs_[c.seq];
      EXPECT_EQ(c.start, s.computed) << "seq " << c.seq;
      s.computed += c.len;
      if (s.computed == s.num_tokens) {
        ++s.num_tokens;  // sampled one token
        if (s.num_tokens - s.prompt == s.max_new) {
          s.done = true;
          kv_->Release(c.seq);
          running_.erase(std::find(running_.begin(), running_.end(), c.seq));
        }
      }
    }
    return plan;
  }
  const SimSeq& seq(SeqId id) { return seqs_[id]; }
  KvCacheManager& kv() { return *kv_; }

 private:
  Scheduler sched_;
  std::unique_ptr<KvCacheManager> kv_;
  std::map<SeqId, SimSeq> seqs_;
  std::vector<SeqId> order_, running_;
};

std::vector<std::tuple<SeqId, int64_t, int64_t>> Chunks(const Schedule& s) {
  std::vector<std::tuple<SeqId, int64_t, int64_t>> v;
  for (const auto& c : s.chunks) v.emplace_back(c.seq, c.start, c.len);
  return v;
}
using C = std::vector<std::tuple<SeqId, int64_t, int64_t>>;

TEST(Scheduler, DecodesFirstThenAdmissionThenChunkedPrefill) {
  Sim sim(SchedulerConfig{/*max_batch=*/2, /*prefill_chunk=*/4, /*step_token_budget=*/6}, /*sel_pages=*/2);
  sim.Add(1, 10, 2);  // A
  sim.Add(2, 3, 2);   // B
  sim.Add(3, 2, 1);   // C
  Schedule s = sim.Step();  // A and B admitted (batch full); A chunk 4, B gets the remaining 2
  EXPECT_EQ(s.admit, (std::vector<SeqId>{1, 2}));
  EXPECT_EQ(Chunks(s), (C{{1, 0, 4}, {2, 0, 2}}));
  s = sim.Step();  // B's last prompt token goes first (one token), A continues
  EXPECT_TRUE(s.admit.empty());
  EXPECT_EQ(Chunks(s), (C{{2, 2, 1}, {1, 4, 4}}));
  s = sim.Step();  // B decodes, A finishes its prompt
  EXPECT_EQ(Chunks(s), (C{{2, 3, 1}, {1, 8, 2}}));
  EXPECT_TRUE(sim.seq(2).done);
  s = sim.Step();  // A decodes; B's page is free again, so C is admitted and prefilled
  EXPECT_EQ(s.admit, (std::vector<SeqId>{3}));
  EXPECT_EQ(Chunks(s), (C{{1, 10, 1}, {3, 0, 2}}));
  EXPECT_TRUE(sim.seq(1).done);
  EXPECT_TRUE(sim.seq(3).done);
  s = sim.Step();
  EXPECT_TRUE(s.chunks.empty());
  EXPECT_EQ(sim.kv().FreePages(Pool::kSelection), 2);
}

TEST(Scheduler, HeadOfLineRequestIsNotOvertaken) {
  Sim sim(SchedulerConfig{4, 64, 256}, /*sel_pages=*/2);
  sim.Add(1, 60, 2);   // 1 page
  Schedule s = sim.Step();
  EXPECT_EQ(s.admit, (std::vector<SeqId>{1}));
  sim.Add(2, 100, 20);  // needs 2 pages: waits for 1 to finish
  sim.Add(3, 5, 1);     // would fit, but may not overtake 2
  s = sim.Step();
  EXPECT_TRUE(s.admit.empty());
  EXPECT_EQ(Chunks(s), (C{{1, 60, 1}}));
  EXPECT_TRUE(sim.seq(1).done);
  s = sim.Step();
  EXPECT_EQ(s.admit, (std::vector<SeqId>{2}));  // both pages free now; 3 still waits (no page left)
  EXPECT_EQ(Chunks(s), (C{{2, 0, 64}}));
}

TEST(Scheduler, BudgetBoundsEveryStepAndLongPromptsDoNotStallDecodes) {
  Sim sim(SchedulerConfig{8, 16, 24}, /*sel_pages=*/64);
  for (SeqId id = 1; id <= 4; ++id) sim.Add(id, 3, 50);
  sim.Step();
  sim.Add(10, 1000, 4);  // a long prompt arrives while four streams decode
  for (int step = 0; step < 40; ++step) {
    Schedule s = sim.Step();
    EXPECT_LE(s.tokens, 24);
    int decodes = 0;
    for (const auto& c : s.chunks) {
      if (c.seq != 10) {
        EXPECT_EQ(c.len, 1);
        ++decodes;
      } else {
        EXPECT_LE(c.len, 16);
      }
    }
    for (SeqId id = 1; id <= 4; ++id) {
      if (!sim.seq(id).done) {
        EXPECT_GE(decodes, 1) << "step " << step;
      }
    }
  }
}

TEST(SchedulerConfig, Validate) {
  EXPECT_TRUE((SchedulerConfig{4, 8, 16}).Validate().ok());
  EXPECT_FALSE((SchedulerConfig{0, 8, 16}).Validate().ok());
  EXPECT_FALSE((SchedulerConfig{4, 0, 16}).Validate().ok());
  EXPECT_FALSE((SchedulerConfig{32, 8, 16}).Validate().ok());
}

}  // namespace
}  // namespace needle::engine
