// Step plan layout and filling; see step_plan.h. The arithmetic of where a row lives is
// docs/kv-cache.md's (kernels::SlotForPosition); the order and the ring rule are those of
// engine/cpu_executor.cc.
#include "engine/cuda/step_plan.h"

#include <algorithm>
#include <limits>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "kernels/kv_append.h"

namespace needle::engine::cuda {
namespace {

constexpr size_t kAlign = 64;

size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

int64_t CeilDiv(int64_t a, int64_t b) { return a <= 0 ? 0 : (a - 1) / b + 1; }

constexpr int Index(Pool p) { return static_cast<int>(p); }

// Compressed tokens visible once position t is written (0 for t < 0).
int64_t NumCompressedAt(const NsaParams& n, int64_t t) { return t < 0 ? 0 : n.NumCompressed(t); }

// Which pool the compression reads its raw rows from.
Pool CompressSourcePool(const PlanGeometry& geo) { return geo.mlp_cmp ? Pool::kStaging : Pool::kSelection; }

// Appends a section of `count` elements of `elem` bytes; returns its offset.
size_t Take(size_t* cursor, size_t count, size_t elem) {
  const size_t at = *cursor;
  *cursor = AlignUp(at + count * elem);
  return at;
}

// Logical pages of pool `p` the step reads or writes for a chunk ending at position `last`.
int64_t PagesNeeded(const PlanGeometry& geo, Pool p, int64_t last) {
  const CacheLayout& l = geo.layout;
  switch (p) {
    case Pool::kSelection: return CeilDiv(last + 1, l.page_tokens);
    case Pool::kCompressed: return CeilDiv(NumCompressedAt(geo.nsa, last), l.cmp_page_tokens);
    case Pool::kWindow: return std::min<int64_t>(l.window_ring_pages, CeilDiv(last + 1, l.page_tokens));
    case Pool::kStaging: return 1;
  }
  return 0;
}

}  // namespace

PlanGeometry PlanGeometry::For(const ModelConfig& model, const KvCacheConfig& cache, const PlanLimits& limits) {
  PlanGeometry g;
  g.vocab = model.vocab_size;
  g.is_nsa = model.IsNsa();
  g.nsa = model.nsa;
  g.mlp_cmp = g.is_nsa && model.nsa.compression == Compression::kMlpPreRope;
  g.layout = CacheLayout::For(model, cache);
  for (int p = 0; p < kNumPools; ++p) g.num_pages[p] = g.layout.has_pool[p] ? cache.num_pages[p] : 0;
  g.limits = limits;
  return g;
}

int CompressedCompletedAt(const PlanGeometry& geo, int64_t pos) {
  if (!geo.is_nsa) return 0;
  return static_cast<int>(NumCompressedAt(geo.nsa, pos) - NumCompressedAt(geo.nsa, pos - 1));
}

absl::StatusOr<StepPlanLayout> LayoutStepPlan(const StepPlan& plan, const PlanGeometry& geo, const DecodePadding* pad) {
  StepPlanLayout out;
  const int num_seqs = static_cast<int>(plan.seqs.size());
  if (num_seqs > geo.limits.max_seqs) {
    return absl::InvalidArgumentError(
        absl::StrCat("step has ", num_seqs, " sequences; this executor was built for at most ", geo.limits.max_seqs));
  }
  int64_t total = 0;
  std::unordered_set<SeqId> seen;
  for (const SeqStep& s : plan.seqs) {
    const int64_t len = static_cast<int64_t>(s.tokens.size());
    if (len == 0) return absl::InvalidArgumentError("empty step for a sequence");
    if (!seen.insert(s.seq).second) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq, " appears twice in one step"));
    }
    if (s.start_pos < 0) return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq, ": negative start_pos"));
    if (s.pages == nullptr || s.pages->capacity_tokens < s.start_pos + len) {
      return absl::InternalError(absl::StrCat("sequence ", s.seq, ": cache capacity below ", s.start_pos + len));
    }
    if (s.start_pos + len > geo.limits.max_context) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq, ": positions up to ", s.start_pos + len - 1,
                                                     " exceed this executor's context of ", geo.limits.max_context));
    }
    for (int32_t tok : s.tokens) {
      if (tok < 0 || tok >= geo.vocab) return absl::InvalidArgumentError(absl::StrCat("token id ", tok, " out of range"));
    }
    const int64_t last = s.start_pos + len - 1;
    for (int p = 0; p < kNumPools; ++p) {
      if (!geo.layout.has_pool[p]) continue;
      const auto& table = s.pages->table[p];
      if (static_cast<int64_t>(table.size()) < PagesNeeded(geo, static_cast<Pool>(p), last)) {
        return absl::InternalError(absl::StrCat("sequence ", s.seq, ": ", PoolName(static_cast<Pool>(p)),
                                                " page table has ", table.size(), " pages, too few for position ",
                                                last));
      }
      for (int32_t page : table) {
        if (page < 0 || page >= geo.num_pages[p]) {
          return absl::InternalError(absl::StrCat("sequence ", s.seq, ": ", PoolName(static_cast<Pool>(p)),
                                                  " page id ", page, " outside the pool of ", geo.num_pages[p]));
        }
      }
      out.table_stride[p] = std::max<int32_t>(out.table_stride[p], static_cast<int32_t>(table.size()));
    }
    if (geo.is_nsa) out.num_items += static_cast<int>(NumCompressedAt(geo.nsa, last) - NumCompressedAt(geo.nsa, s.start_pos - 1));
    total += len;
    if (total > geo.limits.max_tokens) {
      return absl::InvalidArgumentError(
          absl::StrCat("step has more than ", geo.limits.max_tokens, " tokens, this executor's maximum"));
    }
  }
  for (int p = 0; p < kNumPools; ++p) {
    if (geo.layout.has_pool[p]) out.table_stride[p] = std::max<int32_t>(out.table_stride[p], 1);
  }
  out.num_tokens = static_cast<int>(total);
  out.num_seqs = num_seqs;
  out.plan_seqs = num_seqs;
  out.plan_items = out.num_items;
  if (pad != nullptr) {
    // Everything the layout depends on becomes the padding's, so that every step padded alike gets
    // byte-identical offsets and launch parameters.
    if (total != num_seqs) return absl::FailedPreconditionError("decode padding: not a pure-decode step");
    if (pad->num_seqs < num_seqs || pad->num_seqs > geo.limits.max_seqs || pad->num_seqs > geo.limits.max_tokens) {
      return absl::FailedPreconditionError(absl::StrCat("decode padding: ", pad->num_seqs, " sequences for a step of ",
                                                        num_seqs, " within limits of ", geo.limits.max_seqs));
    }
    if (pad->num_items < out.num_items || (pad->num_items > 0) != (out.num_items > 0)) {
      return absl::FailedPreconditionError(absl::StrCat("decode padding: ", pad->num_items,
                                                        " compressed tokens for a step completing ", out.num_items));
    }
    for (int p = 0; p < kNumPools; ++p) {
      if (!geo.layout.has_pool[p]) continue;
      if (pad->table_stride[p] < out.table_stride[p]) {
        return absl::FailedPreconditionError(absl::StrCat("decode padding: a ", PoolName(static_cast<Pool>(p)),
                                                          " page table is longer than ", pad->table_stride[p]));
      }
      out.table_stride[p] = pad->table_stride[p];
    }
    out.num_seqs = out.num_tokens = pad->num_seqs;
    out.num_items = pad->num_items;
  }

  // Internal order: decodes, then prefill chunks, each in plan order; padding sequences (one token
  // each) last, so they count as decodes.
  for (int pass = 0; pass < 2; ++pass) {
    for (int i = 0; i < num_seqs; ++i) {
      const bool decode = plan.seqs[i].tokens.size() == 1;
      if (decode == (pass == 0)) out.order.push_back(i);
    }
    if (pass == 0) out.num_decodes = static_cast<int>(out.order.size()) + (out.num_seqs - num_seqs);
  }
  for (int i = 0; i < num_seqs; ++i) {
    const SeqStep& q = plan.seqs[i];
    if (q.tokens.size() != 1) {
      out.max_prefill_end = std::max<int64_t>(out.max_prefill_end, q.start_pos + static_cast<int64_t>(q.tokens.size()));
    }
  }
  int base = 0;
  for (int s = 0; s < out.num_seqs; ++s) {
    out.token_base.push_back(base);
    base += s < num_seqs ? static_cast<int>(plan.seqs[out.order[s]].tokens.size()) : 1;
  }
  int64_t rows = 0;
  for (int i = 0; i < num_seqs; ++i) {
    out.first_row.push_back(rows);
    rows += plan.seqs[i].all_logits ? static_cast<int64_t>(plan.seqs[i].tokens.size()) : 1;
  }
  out.output_rows = static_cast<int>(rows);
  // Padding rows get logits too (a graph computes a fixed number of rows); they are never copied out.
  out.num_logit_rows = out.output_rows + (out.num_seqs - num_seqs);

  const size_t T = static_cast<size_t>(out.num_tokens);
  size_t cursor = 0;
  out.token_ids = Take(&cursor, T, sizeof(int32_t));
  out.positions = Take(&cursor, T, sizeof(int32_t));
  out.cu_tokens = Take(&cursor, out.num_seqs + 1, sizeof(int32_t));
  out.start_pos = Take(&cursor, out.num_seqs, sizeof(int32_t));
  out.prefill_cu_tokens = Take(&cursor, out.num_seqs - out.num_decodes + 1, sizeof(int32_t));
  for (int p = 0; p < kNumPools; ++p) {
    if (geo.layout.has_pool[p]) {
      out.tables[p] = Take(&cursor, static_cast<size_t>(out.num_seqs) * out.table_stride[p], sizeof(int32_t));
    }
  }
  out.sel_slots = Take(&cursor, T, sizeof(int64_t));
  if (geo.HasPool(Pool::kWindow)) out.win_slots = Take(&cursor, T, sizeof(int64_t));
  if (geo.HasPool(Pool::kStaging)) out.stg_slots = Take(&cursor, T, sizeof(int64_t));
  out.items = Take(&cursor, out.num_items, sizeof(kernels::CompressItem));
  out.logit_rows = Take(&cursor, out.num_logit_rows, sizeof(int32_t));
  out.bytes = cursor;
  return out;
}

void WriteStepPlan(const StepPlan& plan, const PlanGeometry& geo, const StepPlanLayout& L, char* base) {
  const CacheLayout& cl = geo.layout;
  const NsaParams& n = geo.nsa;
  int32_t* token_ids = PlanAt<int32_t>(base, L.token_ids);
  int32_t* positions = PlanAt<int32_t>(base, L.positions);
  int32_t* cu = PlanAt<int32_t>(base, L.cu_tokens);
  int32_t* start = PlanAt<int32_t>(base, L.start_pos);
  int32_t* prefill_cu = PlanAt<int32_t>(base, L.prefill_cu_tokens);
  int64_t* sel_slots = PlanAt<int64_t>(base, L.sel_slots);
  int64_t* win_slots = geo.HasPool(Pool::kWindow) ? PlanAt<int64_t>(base, L.win_slots) : nullptr;
  int64_t* stg_slots = geo.HasPool(Pool::kStaging) ? PlanAt<int64_t>(base, L.stg_slots) : nullptr;
  kernels::CompressItem* items = PlanAt<kernels::CompressItem>(base, L.items);
  const int src_pool = Index(CompressSourcePool(geo));
  const int64_t ring_span = static_cast<int64_t>(cl.window_ring_pages) * cl.page_tokens;  // R * P
  const int64_t staging_rows = cl.staging_rows;                                         // l

  int item = 0;
  for (int s = 0; s < L.plan_seqs; ++s) {
    const SeqStep& step = plan.seqs[L.order[s]];
    const SequencePages& pages = *step.pages;
    const int len = static_cast<int>(step.tokens.size());
    const int tb = L.token_base[s];
    const int64_t s0 = step.start_pos, last = s0 + len - 1;
    cu[s] = tb;
    start[s] = static_cast<int32_t>(s0);
    // Decodes hold one token each, so the prefill tokens start at packed token num_decodes.
    if (s >= L.num_decodes) prefill_cu[s - L.num_decodes] = tb - L.num_decodes;
    for (int p = 0; p < kNumPools; ++p) {
      if (!cl.has_pool[p]) continue;
      int32_t* row = PlanAt<int32_t>(base, L.tables[p]) + static_cast<int64_t>(s) * L.table_stride[p];
      const auto& table = pages.table[p];
      std::copy(table.begin(), table.end(), row);
      std::fill(row + table.size(), row + L.table_stride[p], static_cast<int32_t>(geo.num_pages[p]));
    }
    const auto& sel_table = pages.table[Index(Pool::kSelection)];
    for (int j = 0; j < len; ++j) {
      const int64_t pos = s0 + j;
      token_ids[tb + j] = step.tokens[j];
      positions[tb + j] = static_cast<int32_t>(pos);
      sel_slots[tb + j] = kernels::SlotForPosition(sel_table.data(), cl.page_tokens, 0, pos);
      // Ring rows that a later token of this chunk writes again are skipped (-1): the kernel does not
      // order the writes of one launch, and the later row is the one that must survive.
      if (win_slots != nullptr) {
        win_slots[tb + j] = pos + ring_span <= last
                                ? -1
                                : kernels::SlotForPosition(pages.table[Index(Pool::kWindow)].data(), cl.page_tokens,
                                                           cl.window_ring_pages, pos);
      }
      if (stg_slots != nullptr) {
        stg_slots[tb + j] =
            pos + staging_rows <= last
                ? -1
                : kernels::SlotForPosition(pages.table[Index(Pool::kStaging)].data(), cl.staging_rows, 1, pos);
      }
    }
    if (geo.is_nsa) {
      const auto& cmp_table = pages.table[Index(Pool::kCompressed)];
      for (int64_t i = NumCompressedAt(n, s0 - 1); i < NumCompressedAt(n, last); ++i) {
        kernels::CompressItem& it = items[item++];
        it = kernels::CompressItem{};
        it.start = i * n.cmp_stride;
        it.dst_slot = static_cast<int64_t>(cmp_table[i / cl.cmp_page_tokens]) * cl.cmp_page_tokens + i % cl.cmp_page_tokens;
        it.table_offset = static_cast<int32_t>(static_cast<int64_t>(s) * L.table_stride[src_pool]);
        if (geo.mlp_cmp) {
          // Rows >= s0 come from this step's chunk (packed token tb holds position s0); older rows from
          // the staging ring, which still holds (s0 - l, s0) because the block ends at or after s0.
          it.tail_start = s0;
          it.tail_row0 = tb;
        } else {
          it.tail_start = std::numeric_limits<int64_t>::max();
          it.tail_row0 = 0;
        }
      }
    }
  }
  // Padding sequences (DecodePadding): inert rows that read and write no cache.
  for (int s = L.plan_seqs; s < L.num_seqs; ++s) {
    const int tb = L.token_base[s];
    cu[s] = tb;
    start[s] = -1;
    token_ids[tb] = 0;
    positions[tb] = -1;
    sel_slots[tb] = -1;
    if (win_slots != nullptr) win_slots[tb] = -1;
    if (stg_slots != nullptr) stg_slots[tb] = -1;
    for (int p = 0; p < kNumPools; ++p) {
      if (!cl.has_pool[p]) continue;
      int32_t* row = PlanAt<int32_t>(base, L.tables[p]) + static_cast<int64_t>(s) * L.table_stride[p];
      std::fill(row, row + L.table_stride[p], static_cast<int32_t>(geo.num_pages[p]));
    }
  }
  // Padding compressed tokens repeat the first real one: the same bits to the same slot.
  for (; item < L.num_items; ++item) items[item] = items[0];
  cu[L.num_seqs] = L.num_tokens;
  prefill_cu[L.num_seqs - L.num_decodes] = L.num_tokens - L.num_decodes;

  int32_t* logit_rows = PlanAt<int32_t>(base, L.logit_rows);
  for (int s = L.plan_seqs; s < L.num_seqs; ++s) logit_rows[L.output_rows + (s - L.plan_seqs)] = L.token_base[s];
  std::vector<int> internal_of(L.plan_seqs);
  for (int s = 0; s < L.plan_seqs; ++s) internal_of[L.order[s]] = s;
  for (int i = 0; i < L.plan_seqs; ++i) {
    const SeqStep& step = plan.seqs[i];
    const int tb = L.token_base[internal_of[i]];
    const int len = static_cast<int>(step.tokens.size());
    int32_t* out = logit_rows + L.first_row[i];
    if (step.all_logits) {
      for (int j = 0; j < len; ++j) out[j] = tb + j;
    } else {
      out[0] = tb + len - 1;
    }
  }
}

size_t StepPlanBytesBound(const PlanGeometry& geo, const int64_t table_entries[kNumPools]) {
  const size_t T = static_cast<size_t>(geo.limits.max_tokens), S = static_cast<size_t>(geo.limits.max_seqs);
  size_t bytes = 0;
  bytes += AlignUp(T * 4) * 2;           // token ids, positions
  bytes += AlignUp((S + 1) * 4) * 3;     // cu_tokens, start_pos, prefill cu_tokens
  for (int p = 0; p < kNumPools; ++p) {
    if (geo.layout.has_pool[p]) bytes += AlignUp(S * static_cast<size_t>(std::max<int64_t>(table_entries[p], 1)) * 4);
  }
  bytes += AlignUp(T * 8) * 3;           // slots
  if (geo.is_nsa) {
    // A chunk of len tokens completes at most (len - 1) / d + 1 compressed tokens.
    const size_t items = T / static_cast<size_t>(std::max(geo.nsa.cmp_stride, 1)) + S;
    bytes += AlignUp(items * sizeof(kernels::CompressItem));
  }
  bytes += AlignUp(T * 4);               // logit rows (all_logits for every token at most)
  return bytes;
}

}  // namespace needle::engine::cuda
