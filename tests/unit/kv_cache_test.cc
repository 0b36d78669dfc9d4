// Tests of engine/kv_cache: the pool layout per architecture and PagesFor() against hand-computed
// sizes, config validation, the two-phase reservation (failed plans change nothing, growth adds only
// the difference, stale plans abort), seeded random multi-sequence scenarios that check the pool
// invariants after every step, the seeded page permutation, and SizePools against a byte budget.
#include "engine/kv_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

namespace needle::engine {
namespace {

constexpr int kSel = static_cast<int>(Pool::kSelection);
constexpr int kCmp = static_cast<int>(Pool::kCompressed);
constexpr int kWin = static_cast<int>(Pool::kWindow);
constexpr int kStg = static_cast<int>(Pool::kStaging);
using Pages4 = std::vector<int64_t>;  // {selection, compressed, window, staging}

// Tiny hand-built models, one per architecture. Only the fields the cache reads matter; the rest
// just has to validate.
ModelConfig Base(Architecture arch) {
  ModelConfig m;
  m.arch = arch;
  m.vocab_size = 64;
  m.hidden_size = 32;
  m.num_layers = 2;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.head_dim_qk = 8;
  m.head_dim_v = 8;
  m.intermediate_size = 64;
  m.max_position_embeddings = 4096;
  m.bos_token_id = 1;
  m.eos_token_id = 2;
  return m;
}

// nsa-paper: l = 8, d = 4, l' = 16, w = 32, independent branch K/V, MLP compression, d_v != d_k.
ModelConfig PaperTiny() {
  ModelConfig m = Base(Architecture::kNsaPaper);
  m.head_dim_v = 4;
  NsaParams& n = m.nsa;
  n.cmp_block = 8;
  n.cmp_stride = 4;
  n.sel_block = 16;
  n.num_selected = 4;
  n.forced_initial = 1;
  n.forced_local = 2;
  n.window = 32;
  n.compression = Compression::kMlpPreRope;
  n.shared_kv = false;
  n.cmp_mlp_hidden = 16;
  return m;
}

// FLA nsa: l = d = l' = 16, w = 32 (but shared K/V: no window pool), mean compression.
ModelConfig FlaNsaTiny() {
  ModelConfig m = Base(Architecture::kNsa);
  NsaParams& n = m.nsa;
  n.cmp_block = n.cmp_stride = n.sel_block = 16;
  n.num_selected = 4;
  n.forced_initial = 1;
  n.forced_local = 2;
  n.window = 32;
  n.compression = Compression::kMeanPostRope;
  n.shared_kv = true;
  n.cmp_mlp_hidden = 0;
  return m;
}

// llama-nsa: l = d = l' = 16, no window, only the current block forced.
ModelConfig LlamaNsaTiny() {
  ModelConfig m = Base(Architecture::kLlamaNsa);
  NsaParams& n = m.nsa;
  n.cmp_block = n.cmp_stride = n.sel_block = 16;
  n.num_selected = 4;
  n.forced_initial = 0;
  n.forced_local = 1;
  n.window = 0;
  n.compression = Compression::kMeanPostRope;
  n.shared_kv = true;
  n.cmp_mlp_hidden = 0;
  return m;
}

ModelConfig LlamaTiny() { return Base(Architecture::kLlama); }

KvCacheConfig MakeConfig(int page_tokens, int cmp_page_tokens, Pages4 pages, uint64_t seed = 0) {
  KvCacheConfig c;
  c.page_tokens = page_tokens;
  c.cmp_page_tokens = cmp_page_tokens;
  for (int p = 0; p < kNumPools; ++p) c.num_pages[p] = pages[p];
  c.shuffle_seed = seed;
  return c;
}

// One architecture with its page sizes and a pool size of `seqs` sequences of `len` tokens.
struct Case {
  const char* name;
  ModelConfig model;
  int page_tokens;
  int cmp_page_tokens;
  int64_t len;
  int seqs;
};

std::vector<Case> AllCases() {
  return {{"nsa-paper", PaperTiny(), 16, 4, 200, 4},
          {"nsa", FlaNsaTiny(), 32, 2, 300, 4},
          {"llama-nsa", LlamaNsaTiny(), 16, 8, 300, 4},
          {"llama", LlamaTiny(), 8, 64, 300, 4}};
}

KvCacheConfig CaseConfig(const Case& c, uint64_t seed) {
  KvCacheConfig config = MakeConfig(c.page_tokens, c.cmp_page_tokens, {0, 0, 0, 0}, seed);
  const Pages4 one = CacheLayout::For(c.model, config).PagesFor(c.len);
  for (int p = 0; p < kNumPools; ++p) config.num_pages[p] = one[p] * c.seqs;
  return config;
}

Pages4 TableSizes(const SequencePages& pages) {
  Pages4 sizes(kNumPools);
  for (int p = 0; p < kNumPools; ++p) sizes[p] = static_cast<int64_t>(pages.table[p].size());
  return sizes;
}

bool Fits(const Pages4& need, const Pages4& owned) {
  for (int p = 0; p < kNumPools; ++p) {
    if (need[p] > owned[p]) return false;
  }
  return true;
}

// Pool counters as comparable values.
std::vector<std::vector<int64_t>> Counters(const KvCacheManager& m) {
  std::vector<std::vector<int64_t>> out;
  for (const PoolStats& s : m.Stats()) out.push_back({s.present ? 1 : 0, s.total, s.free});
  return out;
}

// --- Layout and PagesFor ---------------------------------------------------------------------

TEST(CacheLayout, PoolsPerArchitecture) {
  struct Expect {
    ModelConfig model;
    int page_tokens;
    std::vector<bool> present;
    int ring;
    int staging_rows;
  };
  for (const Expect& e : std::vector<Expect>{{PaperTiny(), 16, {true, true, true, true}, 3, 8},
                                             {FlaNsaTiny(), 32, {true, true, false, false}, 0, 0},
                                             {LlamaNsaTiny(), 16, {true, true, false, false}, 0, 0},
                                             {LlamaTiny(), 8, {true, false, false, false}, 0, 0}}) {
    ASSERT_TRUE(e.model.Validate().ok()) << e.model.Validate();
    const CacheLayout l = CacheLayout::For(e.model, MakeConfig(e.page_tokens, 4, {1, 1, 1, 1}));
    const std::string arch(ArchitectureName(e.model.arch));
    for (int p = 0; p < kNumPools; ++p) EXPECT_EQ(l.has_pool[p], e.present[p]) << arch << " pool " << p;
    EXPECT_EQ(l.window_ring_pages, e.ring) << arch;
    EXPECT_EQ(l.staging_rows, e.staging_rows) << arch;
    EXPECT_EQ(l.is_nsa, e.model.IsNsa()) << arch;
  }
}

TEST(CacheLayout, WindowAndStagingConditions) {
  ModelConfig m = PaperTiny();
  m.nsa.window = 0;  // no window branch: no window pool
  EXPECT_FALSE(CacheLayout::For(m, MakeConfig(16, 4, {1, 1, 0, 1})).has_pool[kWin]);
  m.nsa.window = 16;  // w = P: a window can straddle two pages
  EXPECT_EQ(CacheLayout::For(m, MakeConfig(16, 4, {1, 1, 1, 1})).window_ring_pages, 2);
  m.nsa.window = 17;
  EXPECT_EQ(CacheLayout::For(m, MakeConfig(16, 4, {1, 1, 1, 1})).window_ring_pages, 3);
  m.nsa.window = 32;
  EXPECT_EQ(CacheLayout::For(m, MakeConfig(32, 4, {1, 1, 1, 1})).window_ring_pages, 2);
  m.nsa.shared_kv = true;  // window is a suffix of the selection cache
  m.head_dim_v = m.head_dim_qk;
  EXPECT_FALSE(CacheLayout::For(m, MakeConfig(16, 4, {1, 1, 0, 1})).has_pool[kWin]);
  m.nsa.compression = Compression::kMeanPostRope;  // needs no raw inputs: no staging
  m.nsa.cmp_block = m.nsa.cmp_stride;
  EXPECT_FALSE(CacheLayout::For(m, MakeConfig(16, 4, {1, 1, 0, 0})).has_pool[kStg]);
}

void ExpectPagesFor(const ModelConfig& model, int page_tokens, int cmp_page_tokens,
                    const std::vector<std::pair<int64_t, Pages4>>& cases) {
  const CacheLayout l = CacheLayout::For(model, MakeConfig(page_tokens, cmp_page_tokens, {1, 1, 1, 1}));
  for (const auto& [n, want] : cases) {
    EXPECT_EQ(l.PagesFor(n), want) << ArchitectureName(model.arch) << " at " << n << " tokens";
  }
}

TEST(CacheLayout, PagesForNsaPaper) {
  // P = 16, Pc = 4, l = 8, d = 4, ring = ceil(32/16) + 1 = 3. N_c(n-1) = 0 if n < 8 else (n-8)/4 + 1.
  ExpectPagesFor(PaperTiny(), 16, 4,
                 {{0, {0, 0, 0, 0}},
                  {1, {1, 0, 1, 1}},
                  {7, {1, 0, 1, 1}},     // N_c = 0: first compression block incomplete
                  {8, {1, 1, 1, 1}},     // N_c = 1
                  {15, {1, 1, 1, 1}},    // P - 1
                  {16, {1, 1, 1, 1}},    // P, N_c = 3
                  {17, {2, 1, 2, 1}},    // P + 1
                  {23, {2, 1, 2, 1}},    // N_c = 4 = Pc: first compressed page full
                  {24, {2, 2, 2, 1}},    // N_c = 5: second compressed page
                  {33, {3, 2, 3, 1}},    // window ring reaches 3 pages
                  {39, {3, 2, 3, 1}},    // N_c = 8
                  {40, {3, 3, 3, 1}},    // N_c = 9
                  {49, {4, 3, 3, 1}},    // 4 raw pages, the ring stays at 3
                  {1000, {63, 63, 3, 1}}});  // N_c = 249
}

TEST(CacheLayout, PagesForFlaNsa) {
  // P = 32 (two selection blocks per page), Pc = 2, l = d = 16: N_c(n-1) = n / 16.
  ExpectPagesFor(FlaNsaTiny(), 32, 2,
                 {{0, {0, 0, 0, 0}},
                  {1, {1, 0, 0, 0}},
                  {15, {1, 0, 0, 0}},
                  {16, {1, 1, 0, 0}},
                  {31, {1, 1, 0, 0}},
                  {32, {1, 1, 0, 0}},   // N_c = 2 = Pc
                  {33, {2, 1, 0, 0}},
                  {47, {2, 1, 0, 0}},
                  {48, {2, 2, 0, 0}},   // N_c = 3
                  {1000, {32, 31, 0, 0}}});  // N_c = 62
}

TEST(CacheLayout, PagesForLlamaNsa) {
  // P = 16, Pc = 8, l = d = 16: a compressed page covers 128 tokens.
  ExpectPagesFor(LlamaNsaTiny(), 16, 8,
                 {{0, {0, 0, 0, 0}},
                  {1, {1, 0, 0, 0}},
                  {15, {1, 0, 0, 0}},
                  {16, {1, 1, 0, 0}},
                  {17, {2, 1, 0, 0}},
                  {143, {9, 1, 0, 0}},  // N_c = 8
                  {144, {9, 2, 0, 0}},  // N_c = 9
                  {1000, {63, 8, 0, 0}}});  // N_c = 62
}

TEST(CacheLayout, PagesForLlama) {
  ExpectPagesFor(LlamaTiny(), 8, 64,
                 {{0, {0, 0, 0, 0}}, {1, {1, 0, 0, 0}}, {7, {1, 0, 0, 0}}, {8, {1, 0, 0, 0}},
                  {9, {2, 0, 0, 0}}, {1000, {125, 0, 0, 0}}});
}

// --- Config validation ------------------------------------------------------------------------

TEST(KvCacheConfig, Validate) {
  const ModelConfig paper = PaperTiny(), llama = LlamaTiny();
  EXPECT_TRUE(MakeConfig(16, 4, {1, 1, 1, 1}).Validate(paper).ok());
  EXPECT_TRUE(MakeConfig(32, 4, {1, 1, 1, 1}).Validate(paper).ok());
  EXPECT_FALSE(MakeConfig(0, 4, {1, 1, 1, 1}).Validate(paper).ok());
  EXPECT_FALSE(MakeConfig(-16, 4, {1, 1, 1, 1}).Validate(paper).ok());
  absl::Status not_multiple = MakeConfig(24, 4, {1, 1, 1, 1}).Validate(paper);  // l' = 16
  EXPECT_EQ(not_multiple.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(not_multiple.message().find("multiple"), std::string::npos) << not_multiple;
  EXPECT_TRUE(MakeConfig(24, 4, {1, 0, 0, 0}).Validate(llama).ok());  // dense: any P
  EXPECT_FALSE(MakeConfig(16, 0, {1, 1, 1, 1}).Validate(paper).ok());
  EXPECT_FALSE(MakeConfig(16, 0, {1, 0, 0, 0}).Validate(llama).ok());
  EXPECT_FALSE(MakeConfig(16, 4, {1, -1, 1, 1}).Validate(paper).ok());
  EXPECT_FALSE(MakeConfig(16, 4, {1, 0, 0, -1}).Validate(llama).ok());  // negative, even if absent
  EXPECT_TRUE(MakeConfig(16, 4, {2147483647, 1, 1, 1}).Validate(paper).ok());
  EXPECT_FALSE(MakeConfig(16, 4, {2147483648LL, 1, 1, 1}).Validate(paper).ok());
  // Every present pool needs a page; absent pools may be empty.
  for (int p = 0; p < kNumPools; ++p) {
    Pages4 pages = {1, 1, 1, 1};
    pages[p] = 0;
    absl::Status s = MakeConfig(16, 4, pages).Validate(paper);
    EXPECT_FALSE(s.ok()) << p;
    EXPECT_NE(s.message().find(PoolName(static_cast<Pool>(p))), std::string::npos) << s;
  }
  EXPECT_TRUE(MakeConfig(16, 4, {1, 1, 0, 0}).Validate(FlaNsaTiny()).ok());
  EXPECT_TRUE(MakeConfig(8, 4, {1, 0, 0, 0}).Validate(llama).ok());
  EXPECT_FALSE(MakeConfig(8, 4, {0, 0, 0, 0}).Validate(llama).ok());
}

TEST(PoolNames, AreTheDocumentedOnes) {
  EXPECT_STREQ(PoolName(Pool::kSelection), "selection");
  EXPECT_STREQ(PoolName(Pool::kCompressed), "compressed");
  EXPECT_STREQ(PoolName(Pool::kWindow), "window");
  EXPECT_STREQ(PoolName(Pool::kStaging), "staging");
}

// --- Two-phase reservation --------------------------------------------------------------------

TEST(KvCacheManager, FreshStatsAndHandOutOrder) {
  KvCacheManager m(PaperTiny(), MakeConfig(16, 4, {10, 6, 9, 3}));
  const std::vector<PoolStats> stats = m.Stats();
  ASSERT_EQ(stats.size(), 4u);
  const Pages4 totals = {10, 6, 9, 3};
  for (int p = 0; p < kNumPools; ++p) {
    EXPECT_STREQ(stats[p].name, PoolName(static_cast<Pool>(p)));
    EXPECT_TRUE(stats[p].present);
    EXPECT_EQ(stats[p].total, totals[p]);
    EXPECT_EQ(stats[p].free, totals[p]);
    EXPECT_EQ(m.FreePages(static_cast<Pool>(p)), totals[p]);
  }
  auto r = m.Plan(7, 40);  // {3, 3, 3, 1}
  ASSERT_TRUE(r.ok()) << r.status();
  m.Commit(*r);
  const SequencePages& pages = m.Pages(7);
  EXPECT_EQ(pages.table[kSel], (std::vector<int32_t>{0, 1, 2}));  // unshuffled: ids in order
  EXPECT_EQ(pages.table[kCmp], (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(pages.table[kWin], (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(pages.table[kStg], (std::vector<int32_t>{0}));
  EXPECT_EQ(m.FreePages(Pool::kSelection), 7);
  EXPECT_EQ(m.FreePages(Pool::kStaging), 2);

  KvCacheManager dense(LlamaTiny(), MakeConfig(8, 4, {5, 7, 7, 7}));  // pages of absent pools ignored
  for (const PoolStats& s : dense.Stats()) {
    const bool sel = std::string(s.name) == "selection";
    EXPECT_EQ(s.present, sel) << s.name;
    EXPECT_EQ(s.total, sel ? 5 : 0) << s.name;
    EXPECT_EQ(s.free, sel ? 5 : 0) << s.name;
  }
}

TEST(KvCacheManager, CapacityIsWhatTheOwnedPagesHold) {
  KvCacheManager m(PaperTiny(), MakeConfig(16, 4, {100, 100, 9, 3}));
  auto r = m.Plan(1, 1);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->capacity_tokens, 7);  // no compressed page yet: position 7 completes compressed token 0
  m.Commit(*r);
  EXPECT_EQ(m.Pages(1).capacity_tokens, 7);
  r = m.Plan(1, 8);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->new_pages[kCmp], 1);
  EXPECT_EQ(r->new_pages[kSel], 0);
  EXPECT_EQ(r->capacity_tokens, 16);  // one selection page; one compressed page holds up to n = 23
  m.Commit(*r);
  r = m.Plan(1, 1000);  // window saturated: capacity bounded by selection (63 * 16) and compressed
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->capacity_tokens, 1008);  // min(63 * 16, 8 + 63 * 4 * 4 - 1 = 1015)
  r = m.Plan(2, 0);  // an empty sequence: registered, no pages
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->capacity_tokens, 0);
  m.Commit(*r);
  EXPECT_TRUE(m.Contains(2));
  EXPECT_EQ(TableSizes(m.Pages(2)), (Pages4{0, 0, 0, 0}));
  EXPECT_EQ(m.num_sequences(), 2u);
}

TEST(KvCacheManager, GrowthAddsOnlyTheDifference) {
  const ModelConfig model = PaperTiny();
  KvCacheManager m(model, MakeConfig(16, 4, {100, 100, 9, 3}, /*seed=*/99));
  const CacheLayout& l = m.layout();
  auto r = m.Plan(5, 10);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(Pages4(r->new_pages, r->new_pages + kNumPools), l.PagesFor(10));
  m.Commit(*r);
  const SequencePages before = m.Pages(5);

  r = m.Plan(5, 40);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(Pages4(r->new_pages, r->new_pages + kNumPools), (Pages4{2, 2, 2, 0}));  // {3,3,3,1} - {1,1,1,1}
  m.Commit(*r);
  const SequencePages& after = m.Pages(5);
  EXPECT_EQ(TableSizes(after), l.PagesFor(40));
  for (int p = 0; p < kNumPools; ++p) {  // existing pages stay where they were
    ASSERT_GE(after.table[p].size(), before.table[p].size());
    EXPECT_TRUE(std::equal(before.table[p].begin(), before.table[p].end(), after.table[p].begin())) << p;
  }
  const std::vector<int32_t> ring = after.table[kWin];
  const int64_t capacity = after.capacity_tokens;

  // Asking for less than the capacity allocates nothing and keeps the capacity.
  for (int64_t n : {int64_t{0}, int64_t{5}, int64_t{40}, capacity}) {
    r = m.Plan(5, n);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(Pages4(r->new_pages, r->new_pages + kNumPools), (Pages4{0, 0, 0, 0})) << n;
    EXPECT_EQ(r->capacity_tokens, capacity) << n;
    m.Commit(*r);
    EXPECT_EQ(m.Pages(5).capacity_tokens, capacity);
  }
  EXPECT_EQ(TableSizes(m.Pages(5)), l.PagesFor(40));

  r = m.Plan(5, 1000);  // the window ring is full: it gets nothing more
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(Pages4(r->new_pages, r->new_pages + kNumPools), (Pages4{60, 60, 0, 0}));
  m.Commit(*r);
  EXPECT_EQ(m.Pages(5).table[kWin], ring);
  EXPECT_EQ(m.Pages(5).table[kStg].size(), 1u);
  EXPECT_EQ(TableSizes(m.Pages(5)), l.PagesFor(1000));
}

TEST(KvCacheManager, FailedPlanChangesNothing) {
  // Compressed pool of 2 pages, staging of 2 slots.
  KvCacheManager m(PaperTiny(), MakeConfig(16, 4, {20, 2, 9, 2}));
  auto first = m.Plan(1, 20);  // {2, 1, 2, 1}
  ASSERT_TRUE(first.ok());
  m.Commit(*first);
  const auto counters = Counters(m);
  const SequencePages pages1 = m.Pages(1);
  auto pending = m.Plan(2, 5);  // a valid plan, made before the failures below
  ASSERT_TRUE(pending.ok());

  auto too_big = m.Plan(2, 40);  // needs 3 compressed pages, 1 free
  ASSERT_FALSE(too_big.ok());
  EXPECT_EQ(too_big.status().code(), absl::StatusCode::kResourceExhausted);
  const std::string msg(too_big.status().message());
  EXPECT_NE(msg.find("compressed"), std::string::npos) << msg;
  EXPECT_NE(msg.find("needs 3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("1 free"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("selection"), std::string::npos) << msg;  // selection has room

  auto grow = m.Plan(1, 24);  // existing sequence: needs 1 more compressed page: fits
  EXPECT_TRUE(grow.ok());
  auto grow_too_much = m.Plan(1, 40);  // needs 2 more, 1 free
  ASSERT_FALSE(grow_too_much.ok());
  EXPECT_NE(grow_too_much.status().message().find("needs 2"), std::string::npos) << grow_too_much.status();
  EXPECT_FALSE(m.CanAdmit(40));
  EXPECT_TRUE(m.CanAdmit(20));
  EXPECT_FALSE(m.Plan(3, -1).ok());

  EXPECT_EQ(Counters(m), counters);
  EXPECT_EQ(m.num_sequences(), 1u);
  EXPECT_FALSE(m.Contains(2));
  for (int p = 0; p < kNumPools; ++p) EXPECT_EQ(m.Pages(1).table[p], pages1.table[p]);
  EXPECT_EQ(m.Pages(1).capacity_tokens, pages1.capacity_tokens);
  m.Commit(*pending);  // failed plans did not move the generation: the old plan is still current
  EXPECT_TRUE(m.Contains(2));

  auto third = m.Plan(3, 1);  // staging: both slots taken
  ASSERT_FALSE(third.ok());
  EXPECT_NE(third.status().message().find("staging"), std::string::npos) << third.status();
}

TEST(KvCacheManager, ReleaseIsCompleteAndIdempotent) {
  KvCacheManager m(PaperTiny(), MakeConfig(16, 4, {20, 20, 9, 3}));
  const auto baseline = Counters(m);
  for (SeqId s : {1, 2, 3}) {
    auto r = m.Plan(s, 30 * s);
    ASSERT_TRUE(r.ok()) << r.status();
    m.Commit(*r);
  }
  m.Release(42);  // unknown: no-op
  EXPECT_EQ(m.num_sequences(), 3u);
  m.Release(2);
  m.Release(2);
  EXPECT_FALSE(m.Contains(2));
  m.Release(1);
  m.Release(3);
  EXPECT_EQ(Counters(m), baseline);
  EXPECT_EQ(m.num_sequences(), 0u);
}

// --- Stale plans are programming errors ---------------------------------------------------------

TEST(KvCacheManagerDeathTest, StalePlanAborts) {
  EXPECT_DEATH(
      {
        KvCacheManager m(PaperTiny(), MakeConfig(16, 4, {20, 20, 9, 3}));
        auto a = m.Plan(1, 10);
        auto b = m.Plan(2, 10);
        m.Commit(*a);
        m.Commit(*b);  // planned before a's commit
      },
      "stale reservation for sequence 2");
  EXPECT_DEATH(
      {
        KvCacheManager m(PaperTiny(), MakeConfig(16, 4, {20, 20, 9, 3}));
        m.Commit(*m.Plan(1, 10));
        auto grow = m.Plan(1, 40);
        m.Release(1);
        m.Commit(*grow);  // would append to a released sequence
      },
      "stale reservation");
  EXPECT_DEATH(
      {
        KvCacheManager m(LlamaTiny(), MakeConfig(8, 4, {4, 0, 0, 0}));
        m.Commit(Reservation{});
      },
      "stale reservation");
  EXPECT_DEATH(
      {
        KvCacheManager m(LlamaTiny(), MakeConfig(8, 4, {4, 0, 0, 0}));
        m.Pages(3);
      },
      "unknown sequence");
  EXPECT_DEATH({ KvCacheManager m(PaperTiny(), MakeConfig(24, 4, {1, 1, 1, 1})); }, "invalid KvCacheConfig");
}

TEST(KvCacheManager, ReleaseOfUnknownIdKeepsPlansCurrent) {
  KvCacheManager m(PaperTiny(), MakeConfig(16, 4, {20, 20, 9, 3}));
  auto r = m.Plan(1, 10);
  ASSERT_TRUE(r.ok());
  m.Release(77);
  m.Commit(*r);  // must not abort
  EXPECT_TRUE(m.Contains(1));
}

// --- Seeded random scenarios ------------------------------------------------------------------

// The test's own PRNG (xorshift64*), independent of the manager's.
class TestRng {
 public:
  explicit TestRng(uint64_t seed) : s_(seed * 2685821657736338717ull + 1) {}
  uint64_t Next() {
    s_ ^= s_ >> 12;
    s_ ^= s_ << 25;
    s_ ^= s_ >> 27;
    return s_ * 2685821657736338717ull;
  }
  int64_t Below(int64_t n) { return static_cast<int64_t>(Next() % static_cast<uint64_t>(n)); }

 private:
  uint64_t s_;
};

// Checks, for every pool: free + owned == total, owned ids in range and distinct; for every
// sequence: its tables are exactly PagesFor(the largest size asked), its capacity is the largest n
// whose PagesFor fits them.
void CheckInvariants(const KvCacheManager& m, const std::map<SeqId, int64_t>& asked, const std::string& where) {
  const std::vector<PoolStats> stats = m.Stats();
  ASSERT_EQ(m.num_sequences(), asked.size()) << where;
  for (int p = 0; p < kNumPools; ++p) {
    std::set<int32_t> ids;
    int64_t owned = 0;
    for (const auto& [seq, n] : asked) {
      ASSERT_TRUE(m.Contains(seq)) << where;
      for (int32_t id : m.Pages(seq).table[p]) {
        ASSERT_GE(id, 0) << where;
        ASSERT_LT(id, stats[p].total) << where;
        ASSERT_TRUE(ids.insert(id).second) << where << ": " << stats[p].name << " page " << id << " owned twice";
        ++owned;
      }
    }
    ASSERT_EQ(stats[p].free + owned, stats[p].total) << where << ": " << stats[p].name;
  }
  for (const auto& [seq, n] : asked) {
    const SequencePages& pages = m.Pages(seq);
    const Pages4 sizes = TableSizes(pages);
    ASSERT_EQ(sizes, m.layout().PagesFor(n)) << where << ": seq " << seq << " asked " << n;
    ASSERT_GE(pages.capacity_tokens, n) << where;
    ASSERT_TRUE(Fits(m.layout().PagesFor(pages.capacity_tokens), sizes)) << where;
    ASSERT_FALSE(Fits(m.layout().PagesFor(pages.capacity_tokens + 1), sizes)) << where << ": capacity too small";
  }
}

void RunScenario(const Case& c, uint64_t shuffle_seed, uint64_t scenario_seed) {
  const std::string tag = absl::StrCat(c.name, " shuffle_seed=", shuffle_seed, " scenario_seed=", scenario_seed);
  const KvCacheConfig config = CaseConfig(c, shuffle_seed);
  ASSERT_TRUE(config.Validate(c.model).ok()) << tag << ": " << config.Validate(c.model);
  KvCacheManager m(c.model, config);
  const auto baseline = Counters(m);
  TestRng rng(scenario_seed);
  std::map<SeqId, int64_t> asked;  // the largest size asked of each live sequence
  SeqId next_id = 100;
  int failures = 0, commits = 0, releases = 0;
  for (int step = 0; step < 1500; ++step) {
    const std::string where = absl::StrCat(tag, " step ", step);
    const int64_t op = rng.Below(10);
    if (op <= 5 || asked.empty()) {  // a new sequence, or growth of a live one
      SeqId seq = next_id;
      int64_t n = rng.Below(c.len + 1);
      if (op >= 3 && !asked.empty()) {
        auto it = std::next(asked.begin(), rng.Below(static_cast<int64_t>(asked.size())));
        seq = it->first;
        n = std::max<int64_t>(0, it->second + rng.Below(c.len / 2) - c.len / 8);  // sometimes shrinks
      }
      const bool exists = asked.count(seq) != 0;
      Pages4 owned(kNumPools, 0);
      if (exists) owned = TableSizes(m.Pages(seq));
      const Pages4 need = m.layout().PagesFor(n);
      bool fits = true;
      for (int p = 0; p < kNumPools; ++p) {
        fits = fits && std::max<int64_t>(0, need[p] - owned[p]) <= m.FreePages(static_cast<Pool>(p));
      }
      const auto before = Counters(m);
      auto r = m.Plan(seq, n);
      ASSERT_EQ(r.ok(), fits) << where << ": seq " << seq << " n " << n << ": " << r.status();
      if (!r.ok()) {
        ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << where;
        ASSERT_EQ(Counters(m), before) << where;
        ++failures;
      } else {
        m.Commit(*r);
        asked[seq] = std::max(exists ? asked[seq] : 0, n);
        if (!exists) ++next_id;
        ++commits;
      }
    } else if (op <= 8) {
      auto it = std::next(asked.begin(), rng.Below(static_cast<int64_t>(asked.size())));
      m.Release(it->first);
      asked.erase(it);
      ++releases;
    } else {
      const auto before = Counters(m);
      m.Release(next_id + 1000);  // never issued
      ASSERT_EQ(Counters(m), before) << where;
    }
    CheckInvariants(m, asked, where);
    if (testing::Test::HasFatalFailure()) return;
  }
  // The scenario must have exercised both outcomes.
  EXPECT_GT(failures, 0) << tag;
  EXPECT_GT(commits, 100) << tag;
  EXPECT_GT(releases, 50) << tag;

  for (const auto& [seq, n] : asked) m.Release(seq);
  EXPECT_EQ(Counters(m), baseline) << tag;
  EXPECT_EQ(m.num_sequences(), 0u) << tag;
  // Every id came back: `seqs` sequences of `len` tokens take every page of every pool.
  std::set<int32_t> ids[kNumPools];
  for (int i = 0; i < c.seqs; ++i) {
    auto r = m.Plan(i, c.len);
    ASSERT_TRUE(r.ok()) << tag << ": " << r.status();
    m.Commit(*r);
    for (int p = 0; p < kNumPools; ++p) ids[p].insert(m.Pages(i).table[p].begin(), m.Pages(i).table[p].end());
  }
  for (int p = 0; p < kNumPools; ++p) {
    EXPECT_EQ(m.FreePages(static_cast<Pool>(p)), 0) << tag << " pool " << p;
    EXPECT_EQ(static_cast<int64_t>(ids[p].size()), config.num_pages[p]) << tag << " pool " << p;
    if (!ids[p].empty()) {
      EXPECT_EQ(*ids[p].begin(), 0) << tag;
      EXPECT_EQ(*ids[p].rbegin(), config.num_pages[p] - 1) << tag;
    }
  }
}

TEST(KvCacheScenario, RandomMixesReturnToBaseline) {
  for (const Case& c : AllCases()) {
    for (uint64_t shuffle_seed : {uint64_t{0}, uint64_t{0x5eed}}) {
      for (uint64_t scenario_seed : {1, 2, 3}) {
        RunScenario(c, shuffle_seed, scenario_seed);
        if (HasFatalFailure()) return;
      }
    }
  }
}

// A scripted multi-step run on nsa-paper (P = 16, Pc = 4, l = 8, d = 4, ring 3): one sequence decodes
// across raw-page, compressed-page and window-ring boundaries while another is admitted and released.
// Each step states the free pages of every pool afterwards, the sequence's capacity, and, for a
// refused step, exactly which pools the error names.
TEST(KvCacheScenario, ScriptedDecodeAcrossPageBoundaries) {
  KvCacheManager m(PaperTiny(), MakeConfig(16, 4, {6, 5, 6, 2}));
  struct Step {
    SeqId seq;
    int64_t from, to;  // plan and commit each size in [from, to]; to < 0: Release(seq)
    bool ok;
    Pages4 free_after;  // {selection, compressed, window, staging}
    int64_t capacity_after;
    std::vector<std::string> named;  // pools a refusal names (all others must not appear)
  };
  const std::vector<Step> script = {
      {1, 5, 5, true, {5, 5, 5, 1}, 7, {}},          // {1,0,1,1}: position 7 would need a compressed page
      {1, 6, 16, true, {5, 4, 5, 1}, 16, {}},        // n = 8 completes compressed token 0
      {2, 30, 30, true, {3, 2, 3, 0}, 32, {}},       // {2,2,2,1}
      {1, 17, 48, true, {1, 0, 1, 0}, 48, {}},       // raw pages at 17, 33; compressed at 24, 40
      {1, 49, 55, true, {0, 0, 1, 0}, 55, {}},       // 4th raw page, ring stays at 3; N_c(54) = 12
      {1, 56, 56, false, {0, 0, 1, 0}, 55, {"compressed"}},            // N_c(55) = 13: a 4th page
      {1, 65, 65, false, {0, 0, 1, 0}, 55, {"selection", "compressed"}},
      {3, 1, 1, false, {0, 0, 1, 0}, 0, {"selection", "staging"}},     // the window has a free page
      {2, 0, -1, true, {2, 2, 3, 1}, 0, {}},
      {1, 56, 56, true, {2, 1, 3, 1}, 64, {}},
      {1, 57, 65, true, {1, 1, 3, 1}, 71, {}},       // {5,4,3,1}: 4 compressed pages hold up to n = 71
      {3, 1, 16, true, {0, 0, 2, 0}, 16, {}},
      {1, 0, -1, true, {5, 4, 5, 1}, 0, {}},
      {3, 0, -1, true, {6, 5, 6, 2}, 0, {}},         // back to the baseline
      {3, 0, -1, true, {6, 5, 6, 2}, 0, {}},         // releasing twice is a no-op
  };
  for (size_t i = 0; i < script.size(); ++i) {
    const Step& st = script[i];
    const std::string where = absl::StrCat("step ", i, " (seq ", st.seq, ", ", st.from, "..", st.to, ")");
    if (st.to < 0) {
      m.Release(st.seq);
      EXPECT_FALSE(m.Contains(st.seq)) << where;
    } else if (st.ok) {
      for (int64_t n = st.from; n <= st.to; ++n) {
        auto r = m.Plan(st.seq, n);
        ASSERT_TRUE(r.ok()) << where << " at " << n << ": " << r.status();
        m.Commit(*r);
      }
      EXPECT_EQ(m.Pages(st.seq).capacity_tokens, st.capacity_after) << where;
    } else {
      auto r = m.Plan(st.seq, st.to);
      ASSERT_FALSE(r.ok()) << where;
      EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << where;
      const std::string msg(r.status().message());
      for (int p = 0; p < kNumPools; ++p) {
        const std::string pool = PoolName(static_cast<Pool>(p));
        const bool named = std::find(st.named.begin(), st.named.end(), pool) != st.named.end();
        EXPECT_EQ(msg.find(pool + " pool") != std::string::npos, named) << where << ": " << msg;
      }
      if (m.Contains(st.seq)) {
        EXPECT_EQ(m.Pages(st.seq).capacity_tokens, st.capacity_after) << where;
      }
    }
    Pages4 free(kNumPools);
    for (int p = 0; p < kNumPools; ++p) free[p] = m.FreePages(static_cast<Pool>(p));
    EXPECT_EQ(free, st.free_after) << where;
  }
  EXPECT_EQ(m.num_sequences(), 0u);
}

// --- Shuffled hand-out order ------------------------------------------------------------------

std::vector<int32_t> TakeAll(const ModelConfig& model, const KvCacheConfig& config, Pool pool, int64_t tokens) {
  KvCacheManager m(model, config);
  auto r = m.Plan(1, tokens);
  EXPECT_TRUE(r.ok()) << r.status();
  if (!r.ok()) return {};
  m.Commit(*r);
  EXPECT_EQ(m.FreePages(pool), 0);
  return m.Pages(1).table[static_cast<int>(pool)];
}

TEST(KvCacheShuffle, SeededPermutationIsDeterministic) {
  const ModelConfig paper = PaperTiny();
  const Pages4 pages = CacheLayout::For(paper, MakeConfig(16, 4, {1, 1, 1, 1})).PagesFor(1000);  // {63,63,3,1}
  for (Pool pool : {Pool::kSelection, Pool::kCompressed}) {
    const int64_t total = pages[static_cast<int>(pool)];
    std::vector<int32_t> identity(total);
    for (int32_t i = 0; i < total; ++i) identity[i] = i;
    EXPECT_EQ(TakeAll(paper, MakeConfig(16, 4, pages, 0), pool, 1000), identity);
    const std::vector<int32_t> a = TakeAll(paper, MakeConfig(16, 4, pages, 1234), pool, 1000);
    const std::vector<int32_t> b = TakeAll(paper, MakeConfig(16, 4, pages, 1234), pool, 1000);
    const std::vector<int32_t> c = TakeAll(paper, MakeConfig(16, 4, pages, 1235), pool, 1000);
    EXPECT_EQ(a, b) << PoolName(pool) << ": same seed, different order";
    EXPECT_NE(a, identity) << PoolName(pool);
    EXPECT_NE(a, c) << PoolName(pool) << ": seeds 1234 and 1235 gave the same order";
    std::vector<int32_t> sorted = a;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(sorted, identity) << PoolName(pool) << ": not a permutation";
  }
  // The selection and compressed pools, of equal size, are shuffled independently.
  EXPECT_NE(TakeAll(paper, MakeConfig(16, 4, pages, 7), Pool::kSelection, 1000),
            TakeAll(paper, MakeConfig(16, 4, pages, 7), Pool::kCompressed, 1000));
}

TEST(KvCacheShuffle, OrderIsPinned) {
  // The order depends only on splitmix64 and Fisher-Yates arithmetic, not on the standard library:
  // it must not change across platforms or releases (tests elsewhere may rely on it).
  const std::vector<int32_t> got = TakeAll(LlamaTiny(), MakeConfig(8, 4, {8, 0, 0, 0}, 1), Pool::kSelection, 64);
  EXPECT_EQ(got, (std::vector<int32_t>{5, 1, 2, 4, 3, 0, 6, 7}));
}

// --- Sizing -----------------------------------------------------------------------------------

TEST(PageBytes, HandComputed) {
  const ModelConfig paper = PaperTiny();  // 2 layers, 2 KV heads, d_k = 8, d_v = 4
  const CacheLayout l = CacheLayout::For(paper, MakeConfig(16, 4, {1, 1, 1, 1}));
  EXPECT_EQ(PageBytes(paper, l, Pool::kSelection, 2), 2 * 2 * 16 * 12 * 2);
  EXPECT_EQ(PageBytes(paper, l, Pool::kCompressed, 2), 2 * 2 * 4 * 12 * 2);
  EXPECT_EQ(PageBytes(paper, l, Pool::kWindow, 2), 2 * 2 * 16 * 12 * 2);
  EXPECT_EQ(PageBytes(paper, l, Pool::kStaging, 2), 2 * 2 * 8 * 12 * 2);  // l = 8 rows
  const ModelConfig llama = LlamaTiny();
  const CacheLayout dl = CacheLayout::For(llama, MakeConfig(8, 4, {1, 0, 0, 0}));
  EXPECT_EQ(PageBytes(llama, dl, Pool::kSelection, 4), 2 * 2 * 8 * 16 * 4);
  EXPECT_EQ(PageBytes(llama, dl, Pool::kCompressed, 4), 0);  // absent pool
}

int64_t ConfigBytes(const ModelConfig& model, const KvCacheConfig& config, int elem_bytes) {
  const CacheLayout l = CacheLayout::For(model, config);
  int64_t bytes = 0;
  for (int p = 0; p < kNumPools; ++p) bytes += config.num_pages[p] * PageBytes(model, l, static_cast<Pool>(p), elem_bytes);
  return bytes;
}

TEST(SizePools, HandComputedSplit) {
  // SizePools keeps the default Pc = 64. Per 1000-token sequence: {63, 4, 3, 1} pages (N_c = 249)
  // of {1536, 6144, 1536, 768} bytes = 126720 bytes.
  const int64_t bytes = 3 * 126720 + 50000;
  const KvCacheConfig c = SizePools(PaperTiny(), bytes, 2, 1000, 16);
  EXPECT_EQ(c.page_tokens, 16);
  EXPECT_EQ(c.cmp_page_tokens, 64);
  // 3 sequences: 9 window pages, 3 staging slots (16128 bytes); the rest, 414032 bytes, split 63:4
  // over 63 * 1536 + 4 * 6144 = 121344 bytes: 414032 * 63 / 121344 = 214.96, 414032 * 4 / 121344 = 13.6.
  EXPECT_EQ(Pages4(c.num_pages, c.num_pages + kNumPools), (Pages4{214, 13, 9, 3}));
  EXPECT_EQ(ConfigBytes(PaperTiny(), c, 2), 214 * 1536 + 13 * 6144 + 9 * 1536 + 3 * 768);
  EXPECT_LE(ConfigBytes(PaperTiny(), c, 2), bytes);
}

// The paper's attention geometry at the size of the paper presets.
ModelConfig PaperBench(int64_t context) {
  ModelConfig bench = Base(Architecture::kNsaPaper);
  bench.num_layers = 30;
  bench.num_heads = 64;
  bench.num_kv_heads = 4;
  bench.head_dim_qk = 192;
  bench.head_dim_v = 128;
  bench.hidden_size = 2560;
  bench.max_position_embeddings = context;
  bench.nsa.cmp_mlp_hidden = 64;
  return bench;
}

TEST(SizePools, AdmitsMaxLengthSequencesWithinBudget) {
  ModelConfig bench = PaperBench(65536);
  ASSERT_TRUE(bench.Validate().ok()) << bench.Validate();
  ModelConfig fla = FlaNsaTiny();
  ModelConfig dense = LlamaTiny();
  struct Sizing {
    const ModelConfig* model;
    int64_t bytes;
    int64_t max_tokens;
    int page_tokens;
  };
  for (const Sizing& s : std::vector<Sizing>{{&bench, 20LL << 30, 65536, 64},
                                             {&bench, 1, 65536, 64},  // too small: one sequence anyway
                                             {&bench, 60LL << 30, 65536, 128},
                                             {&fla, 1 << 20, 1000, 32},
                                             {&fla, 100, 5, 16},  // max below l: compressed pool still gets a page
                                             {&dense, 1 << 20, 1000, 8}}) {
    const std::string tag =
        absl::StrCat(ArchitectureName(s.model->arch), " bytes=", s.bytes, " max=", s.max_tokens, " P=", s.page_tokens);
    const KvCacheConfig c = SizePools(*s.model, s.bytes, 2, s.max_tokens, s.page_tokens);
    ASSERT_TRUE(c.Validate(*s.model).ok()) << tag << ": " << c.Validate(*s.model);
    KvCacheManager m(*s.model, c);
    const Pages4 one = m.layout().PagesFor(s.max_tokens);
    int64_t seq_bytes = 0;
    for (int p = 0; p < kNumPools; ++p) {
      seq_bytes += std::max<int64_t>(one[p], m.layout().has_pool[p] ? 1 : 0) *
                   PageBytes(*s.model, m.layout(), static_cast<Pool>(p), 2);
    }
    const int64_t used = ConfigBytes(*s.model, c, 2);
    const int64_t expect_seqs = std::max<int64_t>(1, s.bytes / seq_bytes);
    if (s.bytes >= seq_bytes) {
      EXPECT_LE(used, s.bytes) << tag;
      EXPECT_GT(used, s.bytes - seq_bytes) << tag << ": more than a sequence's worth left unused";
    } else {
      EXPECT_EQ(used, seq_bytes) << tag << ": the minimum is one sequence";
    }
    // That many max-length sequences are admitted, one after another.
    for (int64_t i = 0; i < expect_seqs; ++i) {
      ASSERT_TRUE(m.CanAdmit(s.max_tokens)) << tag << " sequence " << i;
      auto r = m.Plan(i, s.max_tokens);
      ASSERT_TRUE(r.ok()) << tag << ": " << r.status();
      m.Commit(*r);
    }
    // Proportions: selection and compressed pages in the max-length ratio (to within a page).
    if (m.layout().has_pool[kCmp] && one[kCmp] > 0) {
      const double sel_seqs = static_cast<double>(c.num_pages[kSel]) / one[kSel];
      const double cmp_seqs = static_cast<double>(c.num_pages[kCmp]) / one[kCmp];
      EXPECT_NEAR(sel_seqs, cmp_seqs, 1.0 / std::min(one[kSel], one[kCmp]) + 1e-9) << tag;
    }
  }
}

// With max_batch above the max-length sequences the budget holds, the window rings and staging slots
// cover max_batch sequences (paid from the remainder), so shorter sequences are not capped at that
// count: two and a half 128k sequences' worth of budget admits eight 64k ones with max_batch 8, and
// only two with max_batch 1 (the rings run out first).
TEST(SizePools, PerSequencePoolsCoverMaxBatch) {
  const ModelConfig bench = PaperBench(131072);
  ASSERT_TRUE(bench.Validate().ok()) << bench.Validate();
  const CacheLayout layout = CacheLayout::For(bench, KvCacheConfig{});
  const Pages4 one = layout.PagesFor(131072);
  int64_t seq_bytes = 0, ring_bytes = 0;
  for (int p = 0; p < kNumPools; ++p) {
    const int64_t b = std::max<int64_t>(one[p], layout.has_pool[p] ? 1 : 0) *
                      PageBytes(bench, layout, static_cast<Pool>(p), 2);
    seq_bytes += b;
    if (p == kWin || p == kStg) ring_bytes += b;
  }
  const int64_t bytes = 5 * seq_bytes / 2;
  for (int64_t max_batch : {1, 8}) {
    const std::string tag = absl::StrCat("max_batch ", max_batch);
    const KvCacheConfig c = SizePools(bench, bytes, 2, 131072, 64, max_batch);
    ASSERT_TRUE(c.Validate(bench).ok()) << tag << ": " << c.Validate(bench);
    EXPECT_LE(ConfigBytes(bench, c, 2), bytes) << tag;
    const int64_t rings = max_batch == 1 ? 2 : 8;  // 6 extra rings cost far less than half a sequence
    ASSERT_LT(6 * ring_bytes, seq_bytes / 2);
    EXPECT_EQ(c.num_pages[kWin], rings * one[kWin]) << tag;
    EXPECT_EQ(c.num_pages[kStg], rings * one[kStg]) << tag;
    KvCacheManager m(bench, c);
    for (int i = 0; i < 2; ++i) {  // two max-length sequences still fit
      auto r = m.Plan(100 + i, 131072);
      ASSERT_TRUE(r.ok()) << tag << ": " << r.status();
      m.Commit(*r);
    }
    KvCacheManager half(bench, c);
    int admitted = 0;
    while (admitted < 10 && half.CanAdmit(65536 + 256)) {
      auto r = half.Plan(admitted, 65536 + 256);
      ASSERT_TRUE(r.ok()) << tag << ": " << r.status();
      half.Commit(*r);
      ++admitted;
    }
    EXPECT_EQ(admitted, max_batch == 1 ? 2 : 4) << tag;  // selection pages allow 4 of them (2.5 x 128k / 64k)
  }
}

TEST(SizePools, InvalidInputsGiveAnInvalidConfig) {
  EXPECT_FALSE(SizePools(PaperTiny(), 1 << 20, 2, 1000, 24).Validate(PaperTiny()).ok());  // P not a multiple of l'
  EXPECT_FALSE(SizePools(PaperTiny(), 1 << 20, 2, 1000, 0).Validate(PaperTiny()).ok());
  EXPECT_FALSE(SizePools(PaperTiny(), 1 << 20, 0, 1000, 16).Validate(PaperTiny()).ok());
}

}  // namespace
}  // namespace needle::engine
