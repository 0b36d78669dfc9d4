// Sampling kernels: one thread block per row.
//
// The candidates are ordered by (logit desc, id asc), which is the CPU sampler's (p desc, id asc)
// because p = exp((x - max) / T) is monotone in x. A logit's order key is its fp32 bit pattern made
// monotone (larger x, larger key). The filters and the draw each ask "which element of the current
// set is the first, in that order, whose cumulative weight (1 per element, or p) crosses a target";
// Select() answers with four histogram passes over the key's bytes, most significant first, keeping
// the weight of everything ranked before the current bucket, then resolves ties of the final key by
// id with an ordered block scan. Sets are always prefixes of the order (a cut key and id), optionally
// intersected with p >= min_p. Weights are summed in double, like the CPU sampler; only the grouping
// of the sums differs, which matters only for u (or top_p) within ~1e-15 of a boundary.
#include "kernels/sampling.h"

#include <cub/block/block_scan.cuh>

#include <climits>

#include "kernels/ops_common.cuh"

namespace needle::kernels {
namespace {

constexpr int kThreads = 512;
constexpr int kBins = 256;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float Clean(float x) { return isnan(x) ? -INFINITY : x; }

// Order-preserving map of a (non-NaN) float to uint32; -0 and +0 share a key.
__device__ __forceinline__ uint32_t OrderKey(float x) {
  if (x == 0.0f) return 0x80000000u;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float KeyValue(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The current candidate set of a row: ids with p > 0 ranked at or before (cut_key, cut_id), and with
// p >= min_p when min_p is active. Identical in every thread of the block.
struct RowSet {
  float max_logit;
  bool inf_mode;  // some logit is +inf: those share all the mass
  double temperature;
  uint32_t cut_key;
  int cut_id;
  bool min_p_active;
  double min_p;

  __device__ double Prob(float x) const {
    if (inf_mode) return x == INFINITY ? 1.0 : 0.0;
    return exp((static_cast<double>(x) - static_cast<double>(max_logit)) / temperature);
  }
  __device__ bool InCut(uint32_t key, int id) const { return key > cut_key || (key == cut_key && id <= cut_id); }
  __device__ bool Admits(double p) const { return p > 0.0 && !(min_p_active && p < min_p); }
};

struct SelectResult {
  uint32_t key;  // order key of the crossing element
  int64_t j;     // it is the j-th (1-based) of the set's elements with that key, in id order
  int64_t ties;  // number of the set's elements with that key
};

struct Shared {
  double hist_w[kBins];
  int hist_c[kBins];
  double pick_before;
  int pick_bin;
  int pick_crossed;
  int pick_count;
  int found_id;
  double dscratch[32];
  float fscratch[32];
  typename cub::BlockScan<int, kThreads>::TempStorage scan;
};

__device__ __forceinline__ bool Crosses(double cum, double target, bool strict) {
  return strict ? cum > target : cum >= target;
}

__device__ __forceinline__ void Flush(Shared& sm, int bin, double w, int c) {
  if (bin < 0) return;
  atomicAdd(&sm.hist_w[bin], w);
  atomicAdd(&sm.hist_c[bin], c);
}

// Total weight (count or mass) of the set.
__device__ double SetTotal(const float* x, int vocab, const RowSet& set, bool count, Shared& sm) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = Clean(x[i]);
    if (!set.InCut(OrderKey(v), i)) continue;
    const double p = set.Prob(v);
    if (set.Admits(p)) acc += count ? 1.0 : p;
  }
  return BlockSum(acc, sm.dscratch);
}

// Warp 0: picks the bin of this pass. Lane l owns bins 255 - 8l down to 248 - 8l (descending order).
__device__ void PickBin(Shared& sm, double before, double target, bool strict) {
  const int lane = threadIdx.x & 31;
  double lw = 0.0;
  int lc = 0;
  for (int q = 0; q < 8; ++q) {
    const int b = kBins - 1 - 8 * lane - q;
    lw += sm.hist_w[b];
    lc += sm.hist_c[b];
  }
  double incl = lw;
  for (int o = 1; o < 32; o <<= 1) {
    const double t = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += t;
  }
  double excl = __shfl_up_sync(kFull, incl, 1);
  if (lane == 0) excl = 0.0;
  const unsigned crossing = __ballot_sync(kFull, lc > 0 && Crosses(before + incl, target, strict));
  const unsigned nonempty = __ballot_sync(kFull, lc > 0);
  if (crossing != 0) {
    if (lane == __ffs(crossing) - 1) {
      double acc = before + excl, last_before = acc;
      int last = -1;
      bool crossed = false;
      for (int q = 0; q < 8; ++q) {
        const int b = kBins - 1 - 8 * lane - q;
        if (sm.hist_c[b] == 0) continue;
        if (Crosses(acc + sm.hist_w[b], target, strict)) {
          last = b;
          last_before = acc;
          crossed = true;
          break;
        }
        last = b;
        last_before = acc;
        acc += sm.hist_w[b];
      }
      // Without a crossing inside the lane (the lane sum rounded differently), take its last bin.
      sm.pick_bin = last;
      sm.pick_before = last_before;
      sm.pick_crossed = crossed;
      sm.pick_count = sm.hist_c[last];
    }
  } else if (nonempty != 0) {
    // Nothing crosses (target at or beyond the total): the set's last element, in the lowest bin.
    if (lane == 31 - __clz(nonempty)) {
      int last = -1;
      for (int q = 0; q < 8; ++q) {
        const int b = kBins - 1 - 8 * lane - q;
        if (sm.hist_c[b] != 0) last = b;
      }
      sm.pick_bin = last;
      sm.pick_before = before + incl - sm.hist_w[last];
      sm.pick_crossed = 0;
      sm.pick_count = sm.hist_c[last];
    }
  } else if (lane == 0) {
    sm.pick_bin = -1;  // empty set: cannot happen for the callers (the top element is always in)
    sm.pick_before = before;
    sm.pick_crossed = 0;
    sm.pick_count = 0;
  }
}

// The first element of the set, in order, whose cumulative weight crosses `target` (>=, or > when
// strict); the set's last element if none does.
__device__ SelectResult Select(const float* x, int vocab, const RowSet& set, bool count, double target,
                               bool strict, Shared& sm) {
  uint32_t prefix = 0, mask = 0;
  double before = 0.0;
  bool crossed = false;
  int ties = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
      sm.hist_w[b] = 0.0;
      sm.hist_c[b] = 0;
    }
    __syncthreads();
    // Run-length aggregation: most early-pass elements share a bin, so flush only on a change.
    int cur = -1, cur_c = 0;
    double cur_w = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float v = Clean(x[i]);
      const uint32_t k = OrderKey(v);
      if ((k & mask) != prefix || !set.InCut(k, i)) continue;
      const double p = set.Prob(v);
      if (!set.Admits(p)) continue;
      const int bin = static_cast<int>((k >> shift) & 0xffu);
      const double w = count ? 1.0 : p;
      if (bin != cur) {
        Flush(sm, cur, cur_w, cur_c);
        cur = bin;
        cur_w = w;
        cur_c = 1;
      } else {
        cur_w += w;
        ++cur_c;
      }
    }
    Flush(sm, cur, cur_w, cur_c);
    __syncthreads();
    if (threadIdx.x < 32) PickBin(sm, before, target, strict);
    __syncthreads();
    const int bin = sm.pick_bin < 0 ? 0 : sm.pick_bin;
    prefix |= static_cast<uint32_t>(bin) << shift;
    mask |= 0xffu << shift;
    before = sm.pick_before;
    crossed = sm.pick_crossed != 0;
    ties = sm.pick_count;
    __syncthreads();  // the next pass clears the histogram warp 0 just read
  }
  SelectResult r;
  r.key = prefix;
  r.ties = ties;
  r.j = ties;
  if (crossed && ties > 0) {
    const double w = count ? 1.0 : set.Prob(KeyValue(prefix));
    const double n = (target - before) / w;
    int64_t j = strict ? static_cast<int64_t>(floor(n)) + 1 : static_cast<int64_t>(ceil(n));
    if (j < 1) j = 1;
    if (j > ties) j = ties;
    r.j = j;
  }
  return r;
}

// The j-th lowest id among the set's elements with order key `key`.
__device__ int FindNthId(const float* x, int vocab, const RowSet& set, uint32_t key, int64_t j, Shared& sm) {
  const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
  const int begin = min(vocab, static_cast<int>(threadIdx.x) * chunk), end = min(vocab, begin + chunk);
  auto matches = [&](int i) { return OrderKey(Clean(x[i])) == key && set.InCut(key, i); };
  int cnt = 0;
  for (int i = begin; i < end; ++i) cnt += matches(i) ? 1 : 0;
  int excl = 0;
  if (threadIdx.x == 0) sm.found_id = -1;
  cub::BlockScan<int, kThreads>(sm.scan).ExclusiveSum(cnt, excl);  // synchronises
  if (excl < j && j <= excl + cnt) {
    int need = static_cast<int>(j - excl);
    for (int i = begin; i < end; ++i) {
      if (matches(i) && --need == 0) {
        sm.found_id = i;
        break;
      }
    }
  }
  __syncthreads();
  const int id = sm.found_id;
  __syncthreads();
  return id;
}

// Narrows the set to its prefix ending at the selected element.
__device__ void ApplyCut(const float* x, int vocab, const SelectResult& r, RowSet& set, Shared& sm) {
  int id;
  if (r.j == r.ties) {
    id = r.key == set.cut_key ? set.cut_id : INT_MAX;  // every tie of the key that the set holds
  } else {
    id = FindNthId(x, vocab, set, r.key, r.j, sm);
  }
  set.cut_key = r.key;
  set.cut_id = id;
}

__device__ int Argmax(const float* x, int vocab, Shared& sm) {
  float best = -INFINITY;
  int best_id = INT_MAX;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = Clean(x[i]);
    if (v > best || (v == best && i < best_id)) {
      best = v;
      best_id = i;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFull, best, o);
    const int oi = __shfl_xor_sync(kFull, best_id, o);
    if (ov > best || (ov == best && oi < best_id)) {
      best = ov;
      best_id = oi;
    }
  }
  __shared__ int ids[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
    sm.fscratch[warp] = best;
    ids[warp] = best_id;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    best = lane < warps ? sm.fscratch[lane] : -INFINITY;
    best_id = lane < warps ? ids[lane] : INT_MAX;
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(kFull, best, o);
      const int oi = __shfl_xor_sync(kFull, best_id, o);
      if (ov > best || (ov == best && oi < best_id)) {
        best = ov;
        best_id = oi;
      }
    }
  }
  return best_id;  // valid in thread 0
}

__global__ void __launch_bounds__(kThreads) SampleKernel(SampleParams p, float* work) {
  __shared__ Shared sm;
  const int row = blockIdx.x;
  const SamplingRow r = p.rows[row];
  const int vocab = p.vocab;
  float* x = work + static_cast<int64_t>(row) * vocab;
  const float* src = p.logits + static_cast<int64_t>(row) * p.logits_stride;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) x[i] = src[i];
  __syncthreads();

  // Penalties, in engine::Sampler::ApplyPenalties's fp32 operations (ids are unique per row).
  if (p.penalty_offsets != nullptr) {
    const bool repetition = r.repetition_penalty != 1.0f;
    const bool additive = r.presence_penalty != 0.0f || r.frequency_penalty != 0.0f;
    for (int e = p.penalty_offsets[row] + threadIdx.x; e < p.penalty_offsets[row + 1]; e += blockDim.x) {
      const int id = p.penalty_ids[e];
      if (id < 0 || id >= vocab) continue;
      float v = x[id];
      if (repetition) v = v > 0.0f ? __fdiv_rn(v, r.repetition_penalty) : __fmul_rn(v, r.repetition_penalty);
      const int c = p.penalty_counts[e];
      if (additive && c > 0) {
        v = __fsub_rn(v, __fadd_rn(r.presence_penalty, __fmul_rn(r.frequency_penalty, static_cast<float>(c))));
      }
      x[id] = v;
    }
    __syncthreads();
  }

  if (r.temperature == 0.0f) {
    const int id = Argmax(x, vocab, sm);
    if (threadIdx.x == 0) p.tokens[row] = id;
    return;
  }

  float m = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, Clean(x[i]));
  m = BlockMax(m, sm.fscratch);
  if (m == -INFINITY) {  // every id masked: answer as greedy does
    if (threadIdx.x == 0) p.tokens[row] = 0;
    return;
  }
  RowSet set;
  set.max_logit = m;
  set.inf_mode = m == INFINITY;
  set.temperature = static_cast<double>(r.temperature);
  set.cut_key = 0;
  set.cut_id = INT_MAX;
  set.min_p_active = false;
  set.min_p = 0.0;

  if (r.top_k > 0) {
    const double n = SetTotal(x, vocab, set, /*count=*/true, sm);
    if (static_cast<double>(r.top_k) < n) {
      const SelectResult s = Select(x, vocab, set, true, static_cast<double>(r.top_k), /*strict=*/false, sm);
      ApplyCut(x, vocab, s, set, sm);
    }
  }
  if (r.top_p < 1.0f) {
    const double total = SetTotal(x, vocab, set, false, sm);
    const SelectResult s = Select(x, vocab, set, false, static_cast<double>(r.top_p) * total, false, sm);
    ApplyCut(x, vocab, s, set, sm);
  }
  if (r.min_p > 0.0f) {
    // The most probable id has p = 1, so min_p * max p is min_p.
    set.min_p_active = true;
    set.min_p = static_cast<double>(r.min_p);
  }
  const double mass = SetTotal(x, vocab, set, false, sm);
  const SelectResult s = Select(x, vocab, set, false, r.uniform * mass, /*strict=*/true, sm);
  const int id = FindNthId(x, vocab, set, s.key, s.j, sm);
  if (threadIdx.x == 0) p.tokens[row] = id < 0 ? 0 : id;
}

__global__ void __launch_bounds__(kThreads) LogSoftmaxKernel(LogSoftmaxParams p) {
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  const int row = blockIdx.x;
  const float* x = p.logits + static_cast<int64_t>(row) * p.logits_stride;
  float* out = p.out + static_cast<int64_t>(row) * p.out_stride;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) m = fmaxf(m, Clean(x[i]));
  m = BlockMax(m, fscratch);
  if (isfinite(m)) {
    double s = 0.0;
    for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) s += exp(static_cast<double>(Clean(x[i])) - m);
    const double lse = static_cast<double>(m) + log(BlockSum(s, dscratch));
    for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) {
      out[i] = static_cast<float>(static_cast<double>(Clean(x[i])) - lse);
    }
  } else if (m == INFINITY) {
    double n = 0.0;
    for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) n += x[i] == INFINITY ? 1.0 : 0.0;
    const float share = static_cast<float>(-log(BlockSum(n, dscratch)));
    for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) out[i] = x[i] == INFINITY ? share : -INFINITY;
  } else {
    for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) out[i] = -INFINITY;
  }
}

}  // namespace

size_t SampleWorkspaceBytes(int batch, int vocab) {
  return sizeof(float) * static_cast<size_t>(batch > 0 ? batch : 0) * (vocab > 0 ? vocab : 0);
}

cudaError_t LaunchSample(const SampleParams& p, void* workspace, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  if (p.batch < 0 || p.vocab <= 0 || p.logits == nullptr || p.logits_stride < p.vocab || p.rows == nullptr ||
      p.tokens == nullptr || workspace == nullptr ||
      (p.penalty_offsets != nullptr && (p.penalty_ids == nullptr || p.penalty_counts == nullptr))) {
    return cudaErrorInvalidValue;
  }
  SampleKernel<<<p.batch, kThreads, 0, stream>>>(p, static_cast<float*>(workspace));
  return cudaGetLastError();
}

cudaError_t LaunchLogSoftmax(const LogSoftmaxParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  if (p.batch < 0 || p.vocab <= 0 || p.logits == nullptr || p.out == nullptr || p.logits_stride < p.vocab ||
      p.out_stride < p.vocab) {
    return cudaErrorInvalidValue;
  }
  LogSoftmaxKernel<<<p.batch, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace needle::kernels
