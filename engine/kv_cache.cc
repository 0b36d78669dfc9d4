// KvCacheManager and its arithmetic: which pools a model needs, how many pages a sequence of n tokens
// occupies in each, the free lists and per-sequence page tables, and the sizing of the pools from a
// byte budget. Accounting only: it never touches the cache memory (the executor owns it) and never
// sees requests, threads or devices. Layouts and invariants are in docs/kv-cache.md.
#include "engine/kv_cache.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace needle::engine {
namespace {

constexpr int64_t kMaxPages = std::numeric_limits<int32_t>::max();  // ids must fit int32
constexpr int64_t kUnbounded = std::numeric_limits<int64_t>::max();

// A check for states that cannot happen unless the caller misuses the API: message and abort.
void CheckOrDie(bool ok, const std::string& what) {
  if (ok) return;
  std::fprintf(stderr, "KvCacheManager: check failed: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

int64_t CeilDiv(int64_t a, int64_t b) { return a <= 0 ? 0 : (a - 1) / b + 1; }

constexpr int Index(Pool p) { return static_cast<int>(p); }

// splitmix64 (Steele, Lea, Flood): a tiny PRNG whose output is fully specified by its arithmetic,
// so a seed gives the same page order on every platform and standard library.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n), n > 0, without modulo bias: rejects draws below 2^64 mod n.
  uint64_t Below(uint64_t n) {
    const uint64_t threshold = (0 - n) % n;
    for (;;) {
      uint64_t r = Next();
      if (r >= threshold) return r % n;
    }
  }

 private:
  uint64_t state_;
};

// Largest token count whose PagesFor() fits in `owned` pages of every present pool.
int64_t CapacityFor(const CacheLayout& layout, const int64_t owned[kNumPools]) {
  int64_t cap = owned[Index(Pool::kSelection)] * layout.page_tokens;
  if (layout.has_pool[Index(Pool::kCompressed)]) {
    // N_c(n - 1) <= K  <=>  n < l + K*d, with K = owned compressed pages * Pc.
    const NsaParams& nsa = layout.nsa;
    const int64_t pages = owned[Index(Pool::kCompressed)];
    const int64_t per_page = static_cast<int64_t>(layout.cmp_page_tokens) * nsa.cmp_stride;
    int64_t cmp_cap = kUnbounded;
    if (pages <= (kUnbounded - nsa.cmp_block) / per_page) cmp_cap = nsa.cmp_block + pages * per_page - 1;
    cap = std::min(cap, cmp_cap);
  }
  if (layout.has_pool[Index(Pool::kWindow)] && owned[Index(Pool::kWindow)] < layout.window_ring_pages) {
    cap = std::min(cap, owned[Index(Pool::kWindow)] * layout.page_tokens);
  }
  if (layout.has_pool[Index(Pool::kStaging)] && owned[Index(Pool::kStaging)] == 0) cap = 0;
  return cap;
}

}  // namespace

const char* PoolName(Pool pool) {
  switch (pool) {
    case Pool::kSelection: return "selection";
    case Pool::kCompressed: return "compressed";
    case Pool::kWindow: return "window";
    case Pool::kStaging: return "staging";
  }
  return "unknown";
}

absl::Status KvCacheConfig::Validate(const ModelConfig& model) const {
  auto bad = [](absl::string_view what) { return absl::InvalidArgumentError(absl::StrCat("KV cache: ", what)); };
  if (page_tokens <= 0) return bad(absl::StrCat("page_tokens must be positive, got ", page_tokens));
  if (model.IsNsa() && model.nsa.sel_block > 0 && page_tokens % model.nsa.sel_block != 0) {
    return bad(absl::StrCat("page_tokens (", page_tokens, ") must be a multiple of the selection block l' (",
                            model.nsa.sel_block, ")"));
  }
  if (cmp_page_tokens <= 0) return bad(absl::StrCat("cmp_page_tokens must be positive, got ", cmp_page_tokens));
  const CacheLayout layout = CacheLayout::For(model, *this);
  for (int p = 0; p < kNumPools; ++p) {
    const char* name = PoolName(static_cast<Pool>(p));
    if (num_pages[p] < 0) return bad(absl::StrCat(name, " pool: page count must be >= 0, got ", num_pages[p]));
    if (num_pages[p] > kMaxPages) {
      return bad(absl::StrCat(name, " pool: ", num_pages[p], " pages exceed the int32 page ids (max ", kMaxPages, ")"));
    }
    if (layout.has_pool[p] && num_pages[p] == 0) {
      return bad(absl::StrCat(name, " pool: the model needs it, so it must have at least one page"));
    }
  }
  return absl::OkStatus();
}

CacheLayout CacheLayout::For(const ModelConfig& model, const KvCacheConfig& config) {
  CacheLayout layout;
  layout.page_tokens = config.page_tokens;
  layout.cmp_page_tokens = config.cmp_page_tokens;
  layout.is_nsa = model.IsNsa();
  if (!layout.is_nsa) return layout;  // selection only; nsa stays default (unused)
  const NsaParams& nsa = model.nsa;
  layout.nsa = nsa;
  layout.has_pool[Index(Pool::kCompressed)] = true;
  if (!nsa.shared_kv && nsa.window > 0) {
    layout.has_pool[Index(Pool::kWindow)] = true;
    // w keys span at most ceil(w/P) + 1 pages of P tokens wherever the window starts.
    if (config.page_tokens > 0) layout.window_ring_pages = static_cast<int>(CeilDiv(nsa.window, config.page_tokens) + 1);
  }
  if (nsa.compression == Compression::kMlpPreRope) {
    layout.has_pool[Index(Pool::kStaging)] = true;
    layout.staging_rows = nsa.cmp_block;
  }
  return layout;
}

std::vector<int64_t> CacheLayout::PagesFor(int64_t num_tokens) const {
  std::vector<int64_t> pages(kNumPools, 0);
  if (num_tokens <= 0) return pages;
  const int64_t raw_pages = CeilDiv(num_tokens, page_tokens);
  pages[Index(Pool::kSelection)] = raw_pages;
  if (has_pool[Index(Pool::kCompressed)]) {
    pages[Index(Pool::kCompressed)] = CeilDiv(nsa.NumCompressed(num_tokens - 1), cmp_page_tokens);
  }
  if (has_pool[Index(Pool::kWindow)]) pages[Index(Pool::kWindow)] = std::min<int64_t>(window_ring_pages, raw_pages);
  if (has_pool[Index(Pool::kStaging)]) pages[Index(Pool::kStaging)] = 1;
  return pages;
}

KvCacheManager::KvCacheManager(const ModelConfig& model, const KvCacheConfig& config)
    : layout_(CacheLayout::For(model, config)), config_(config) {
  const absl::Status valid = config.Validate(model);
  CheckOrDie(valid.ok(), absl::StrCat("invalid KvCacheConfig (call Validate first): ", valid.ToString()));
  for (int p = 0; p < kNumPools; ++p) {
    if (!layout_.has_pool[p]) continue;  // pages configured for a pool the model lacks are ignored
    // `order` is the hand-out order; the free list pops from the back, so store it reversed.
    std::vector<int32_t> order(static_cast<size_t>(config.num_pages[p]));
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
    if (config.shuffle_seed != 0) {
      SplitMix64 rng(config.shuffle_seed ^ (0xD1B54A32D192ED03ull * static_cast<uint64_t>(p + 1)));
      for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.Below(i)]);  // Fisher-Yates
    }
    free_[p].assign(order.rbegin(), order.rend());
  }
  // Start above 0 so that a default-constructed Reservation is always stale.
  generation_ = 1;
}

absl::StatusOr<Reservation> KvCacheManager::Plan(SeqId seq, int64_t num_tokens) const {
  if (num_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("KV cache: sequence ", seq, ": negative token count ", num_tokens));
  }
  Reservation r;
  r.seq = seq;
  r.generation = generation_;
  int64_t owned[kNumPools] = {0, 0, 0, 0};
  auto it = seqs_.find(seq);
  if (it != seqs_.end()) {
    for (int p = 0; p < kNumPools; ++p) owned[p] = static_cast<int64_t>(it->second.table[p].size());
    r.capacity_tokens = it->second.capacity_tokens;
    if (num_tokens <= r.capacity_tokens) return r;  // never shrinks; nothing to allocate
  }
  const std::vector<int64_t> need = layout_.PagesFor(num_tokens);
  std::string lacking;
  for (int p = 0; p < kNumPools; ++p) {
    r.new_pages[p] = std::max<int64_t>(0, need[p] - owned[p]);
    const int64_t free = static_cast<int64_t>(free_[p].size());
    if (r.new_pages[p] > free) {
      absl::StrAppend(&lacking, lacking.empty() ? "" : "; ", PoolName(static_cast<Pool>(p)), " pool: needs ",
                      r.new_pages[p], " more pages, ", free, " free of ", config_.num_pages[p]);
    }
    owned[p] += r.new_pages[p];
  }
  if (!lacking.empty()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache exhausted for sequence ", seq, " at ", num_tokens, " tokens: ", lacking));
  }
  r.capacity_tokens = CapacityFor(layout_, owned);
  return r;
}

bool KvCacheManager::CanAdmit(int64_t num_tokens) const {
  const std::vector<int64_t> need = layout_.PagesFor(num_tokens);
  for (int p = 0; p < kNumPools; ++p) {
    if (need[p] > static_cast<int64_t>(free_[p].size())) return false;
  }
  return true;
}

void KvCacheManager::Commit(const Reservation& r) {
  CheckOrDie(r.generation == generation_,
             absl::StrCat("stale reservation for sequence ", r.seq, ": planned at generation ", r.generation,
                          ", manager is at ", generation_, " (Plan and Commit must not be interleaved with "
                          "other Commits or Releases)"));
  SequencePages& pages = seqs_[r.seq];
  for (int p = 0; p < kNumPools; ++p) {
    CheckOrDie(r.new_pages[p] >= 0 && r.new_pages[p] <= static_cast<int64_t>(free_[p].size()),
               absl::StrCat("reservation for sequence ", r.seq, " asks ", r.new_pages[p], " pages of the ",
                            PoolName(static_cast<Pool>(p)), " pool, which has ", free_[p].size(), " free"));
    for (int64_t i = 0; i < r.new_pages[p]; ++i) {
      pages.table[p].push_back(free_[p].back());
      free_[p].pop_back();
    }
  }
  pages.capacity_tokens = r.capacity_tokens;
  ++generation_;
}

void KvCacheManager::Release(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  for (int p = 0; p < kNumPools; ++p) {
    // Reversed, so that the sequence's first page is the next one handed out.
    const std::vector<int32_t>& table = it->second.table[p];
    free_[p].insert(free_[p].end(), table.rbegin(), table.rend());
  }
  seqs_.erase(it);
  ++generation_;  // a plan made before the release may describe the released sequence
}

const SequencePages& KvCacheManager::Pages(SeqId seq) const {
  auto it = seqs_.find(seq);
  CheckOrDie(it != seqs_.end(), absl::StrCat("Pages(", seq, "): unknown sequence"));
  return it->second;
}

std::vector<PoolStats> KvCacheManager::Stats() const {
  std::vector<PoolStats> stats;
  stats.reserve(kNumPools);
  for (int p = 0; p < kNumPools; ++p) {
    const bool present = layout_.has_pool[p];
    stats.push_back(PoolStats{PoolName(static_cast<Pool>(p)), present, present ? config_.num_pages[p] : 0,
                              static_cast<int64_t>(free_[p].size())});
  }
  return stats;
}

int64_t KvCacheManager::FreePages(Pool pool) const { return static_cast<int64_t>(free_[Index(pool)].size()); }

int64_t PageBytes(const ModelConfig& model, const CacheLayout& layout, Pool pool, int elem_bytes) {
  if (!layout.has_pool[Index(pool)]) return 0;
  int64_t rows = 0;
  switch (pool) {
    case Pool::kSelection:
    case Pool::kWindow: rows = layout.page_tokens; break;
    case Pool::kCompressed: rows = layout.cmp_page_tokens; break;
    case Pool::kStaging: rows = layout.staging_rows; break;
  }
  return static_cast<int64_t>(model.num_layers) * model.num_kv_heads * rows *
         (static_cast<int64_t>(model.head_dim_qk) + model.head_dim_v) * elem_bytes;
}

int64_t PoolBytes(const ModelConfig& model, const KvCacheConfig& config, int elem_bytes) {
  const CacheLayout layout = CacheLayout::For(model, config);
  int64_t total = 0;
  for (int p = 0; p < kNumPools; ++p) {
    total += config.num_pages[p] * PageBytes(model, layout, static_cast<Pool>(p), elem_bytes);
  }
  return total;
}

KvCacheConfig SizePools(const ModelConfig& model, int64_t bytes, int elem_bytes, int64_t max_seq_tokens,
                        int page_tokens, int64_t max_batch) {
  KvCacheConfig config;
  config.page_tokens = page_tokens;
  // Invalid inputs: return no pages; Validate() on the result reports the problem.
  if (page_tokens <= 0 || elem_bytes <= 0) return config;
  const CacheLayout layout = CacheLayout::For(model, config);
  std::vector<int64_t> need = layout.PagesFor(std::max<int64_t>(1, max_seq_tokens));
  int64_t page_bytes[kNumPools];
  int64_t seq_bytes = 0;
  for (int p = 0; p < kNumPools; ++p) {
    if (layout.has_pool[p]) need[p] = std::max<int64_t>(need[p], 1);  // a present pool gets a page
    page_bytes[p] = PageBytes(model, layout, static_cast<Pool>(p), elem_bytes);
    seq_bytes += need[p] * page_bytes[p];
  }
  if (seq_bytes <= 0) return config;  // a degenerate model (no layers or heads)
  // Whole max-length sequences the budget holds (at least one). Window rings and staging slots are
  // per sequence: that many of each, plus, from what is left below one more max-length sequence, up
  // to max_batch in all (a 64k sequence under a 128k limit needs a whole ring but only half the
  // selection pages, so more of them fit than max-length ones).
  const int sel = Index(Pool::kSelection), cmp = Index(Pool::kCompressed);
  const int win = Index(Pool::kWindow), stg = Index(Pool::kStaging);
  const int64_t num_seqs = std::max<int64_t>(1, bytes / seq_bytes);
  const int64_t ring_bytes = need[win] * page_bytes[win] + need[stg] * page_bytes[stg];
  int64_t rings = num_seqs;
  if (max_batch > num_seqs && ring_bytes > 0) {
    const int64_t left = std::max<int64_t>(0, bytes - num_seqs * seq_bytes);
    rings += std::min(max_batch - num_seqs, left / ring_bytes);
  }
  for (int p : {win, stg}) config.num_pages[p] = rings * need[p];
  // Selection and compressed grow with length: they share the rest in the max-length proportion, so
  // the remainder below one whole sequence still serves shorter ones.
  // 128-bit: bytes * pages can exceed int64 for large budgets and long sequences.
  const __int128 rest = static_cast<__int128>(bytes) - static_cast<__int128>(config.num_pages[win]) * page_bytes[win] -
                        static_cast<__int128>(config.num_pages[stg]) * page_bytes[stg];
  const __int128 unit =
      static_cast<__int128>(need[sel]) * page_bytes[sel] + static_cast<__int128>(need[cmp]) * page_bytes[cmp];
  for (int p : {sel, cmp}) {
    const __int128 pages = rest > 0 ? rest * need[p] / unit : 0;
    const __int128 min_pages = static_cast<__int128>(num_seqs) * need[p];
    config.num_pages[p] = static_cast<int64_t>(std::min<__int128>(std::max(pages, min_pages), kMaxPages));
  }
  for (int64_t& n : config.num_pages) n = std::min(n, kMaxPages);  // page ids are int32
  return config;
}

}  // namespace needle::engine
