// KvCacheManager: page pools and per-sequence page tables for NSA's caches. It does the accounting
// only (which physical page belongs to which sequence); the executor owns the memory the page ids
// index. Reservation is two-phase: Plan() is const and may fail with no side effects; Commit() applies
// a plan. Never sees requests, threads, CUDA or gRPC. Single-threaded: the engine thread owns it.
//
// Pools (each present only where the architecture needs it; see docs/kv-cache.md):
//   selection  pages of P tokens: raw post-RoPE K/V of every token (the only pool of `llama`)
//   compressed pages of Pc compressed tokens: K_cmp/V_cmp
//   window     pages of P tokens: a ring of ceil(w/P)+1 pages per sequence (independent branch K/V);
//              position p lives in ring page (p / P) % ring_pages, so pages leaving the window are
//              reused in place
//   staging    one slot per sequence: the last l raw pre-RoPE cmp-branch K/V rows (row p % l), where
//              the compression needs inputs no other cache keeps (nsa-paper's MLP)
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model_config.h"

namespace needle::engine {

using SeqId = int64_t;

enum class Pool : int { kSelection = 0, kCompressed = 1, kWindow = 2, kStaging = 3 };
inline constexpr int kNumPools = 4;
const char* PoolName(Pool pool);  // "selection", "compressed", "window", "staging"

struct KvCacheConfig {
  int page_tokens = 64;       // P: tokens per selection/window page; a multiple of l' for NSA models
  int cmp_page_tokens = 64;   // Pc: compressed tokens per compressed-cache page
  int64_t num_pages[kNumPools] = {0, 0, 0, 0};  // capacity of each pool (pages, or slots for staging)
  uint64_t shuffle_seed = 0;  // non-zero: hand out physical pages in a seeded random order (tests)

  absl::Status Validate(const ModelConfig& model) const;
};

// Which caches a model needs and how many pages of each a sequence of n tokens occupies.
struct CacheLayout {
  bool has_pool[kNumPools] = {true, false, false, false};
  int page_tokens = 64;
  int cmp_page_tokens = 64;
  int window_ring_pages = 0;  // ceil(w/P) + 1 when the window pool exists
  int staging_rows = 0;       // l when the staging pool exists
  NsaParams nsa;              // copy of the model's NSA geometry (unused for llama)
  bool is_nsa = false;

  static CacheLayout For(const ModelConfig& model, const KvCacheConfig& config);
  // Pages (slots for staging) each pool must hold for a sequence of `num_tokens` tokens.
  std::vector<int64_t> PagesFor(int64_t num_tokens) const;
};

// A sequence's page tables, as the executor reads them. Logical page i of the selection cache holds
// positions [i*P, (i+1)*P); logical page i of the compressed cache holds compressed tokens
// [i*Pc, (i+1)*Pc); window and staging as above.
struct SequencePages {
  std::vector<int32_t> table[kNumPools];  // staging: at most one slot id
  int64_t capacity_tokens = 0;            // tokens the reserved pages can hold
};

// The outcome of Plan(): what Commit() will allocate.
struct Reservation {
  SeqId seq = 0;
  int64_t capacity_tokens = 0;
  int64_t new_pages[kNumPools] = {0, 0, 0, 0};
  uint64_t generation = 0;  // the manager's state the plan was made against
};

struct PoolStats {
  const char* name;
  bool present;
  int64_t total;
  int64_t free;
};

class KvCacheManager {
 public:
  KvCacheManager(const ModelConfig& model, const KvCacheConfig& config);

  const CacheLayout& layout() const { return layout_; }
  const KvCacheConfig& config() const { return config_; }

  // Plans growing sequence `seq` (new or existing) to hold `num_tokens` tokens. RESOURCE_EXHAUSTED
  // naming the pool when there are not enough free pages; no side effects either way.
  absl::StatusOr<Reservation> Plan(SeqId seq, int64_t num_tokens) const;
  bool CanAdmit(int64_t num_tokens) const;  // a new sequence of that size would fit now
  // Applies a plan made against the current state (a stale plan is a programming error: aborts).
  void Commit(const Reservation& reservation);
  // Returns every page of `seq` to its pool; unknown ids are ignored (idempotent).
  void Release(SeqId seq);

  bool Contains(SeqId seq) const { return seqs_.count(seq) != 0; }
  const SequencePages& Pages(SeqId seq) const;  // seq must be present
  std::vector<PoolStats> Stats() const;
  int64_t FreePages(Pool pool) const;
  size_t num_sequences() const { return seqs_.size(); }

 private:
  CacheLayout layout_;
  KvCacheConfig config_;
  std::vector<int32_t> free_[kNumPools];  // free lists; back() is handed out next
  std::unordered_map<SeqId, SequencePages> seqs_;
  uint64_t generation_ = 0;
};

// Splits `bytes` of cache memory across the pools in the proportions a sequence of
// `max_seq_tokens` needs, for K/V elements of `elem_bytes` bytes. At least one such sequence fits,
// even when that takes more than `bytes` (BuildEngine refuses such a budget; tools that size the
// cache for one known sequence pass bytes = 1). The per-sequence pools (window rings, staging slots)
// get room for at least `max_batch` sequences, so that as many sequences shorter than
// max_seq_tokens as the engine runs at once can be admitted, not only as many max-length ones as
// the budget holds; their bytes come out of the selection and compressed pools' share.
KvCacheConfig SizePools(const ModelConfig& model, int64_t bytes, int elem_bytes, int64_t max_seq_tokens,
                        int page_tokens = 64, int64_t max_batch = 1);
// Bytes one page (slot) of each pool takes across all layers and KV heads, K and V together.
int64_t PageBytes(const ModelConfig& model, const CacheLayout& layout, Pool pool, int elem_bytes);
// Bytes all pools of `config` take together.
int64_t PoolBytes(const ModelConfig& model, const KvCacheConfig& config, int elem_bytes);

}  // namespace needle::engine
