// Hardware primitives of the split-KV attention kernels (kernels/split_kv_attention.cuh): 16-byte
// cp.async copies into shared memory (with zero fill), tensor-map (TMA) box copies completing on an
// mbarrier, ldmatrix, the bf16 m16n8k16 tensor-core MMA, and programmatic dependent launch (PDL)
// controls. Thin wrappers over PTX for sm_80+ (PDL, mbarrier transactions and TMA: sm_90), no
// policy: what to load and how warps share a tile is split_kv_attention.cuh's business.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit inputs), lane = threadIdx.x % 32:
//   A (16x16, row-major) a0: (lane/4, 2(lane%4)+{0,1})   a1: row +8   a2: col +8   a3: row +8, col +8
//   B (16x8, "col")      b0: (k 2(lane%4)+{0,1}, n lane/4)   b1: k +8
//   C (16x8, f32)        c0,c1: (lane/4, 2(lane%4)+{0,1})   c2,c3: row +8
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace needle::kernels::detail {

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// An L2 cache policy for bytes a step reads once (K/V rows): evict them before anything else. Decode
// streams far more K/V than L2 holds, and at normal priority the stream evicts what a step writes for
// its own later kernels (NSA's block scores and partial states, read back by the select and merge
// kernels a few microseconds later). With the K/V copies evict-first those stay in L2: NSA paper
// geometry at 64k batch 8 80.5 -> 73.1 us, FLA batch 64 100.3 -> 90.6 us (docs/perf-notes.md, v8).
__device__ __forceinline__ uint64_t L2EvictFirstPolicy() {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// Copies 16 bytes global -> shared without going through registers (L2 only: the rows are read once,
// evict-first, see above). valid == false writes 16 zero bytes and reads nothing. The L2::256B hint
// has DRAM fetch the aligned 256 bytes around the address at once (the rows of a page are contiguous:
// the neighbouring line is the next row's); paged dense decode went from 97.2% to 98.9% of copy
// bandwidth with it.
__device__ __forceinline__ void CpAsync16(void* smem_dst, const void* gmem_src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2, %3;\n" ::"r"(
                   SharedAddress(smem_dst)),
               "l"(gmem_src), "r"(src_bytes), "l"(L2EvictFirstPolicy())
               : "memory");
}

__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `kPending` committed groups of this thread are still in flight.
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ---- mbarrier and tensor-map copies (sm_90) ------------------------------------------------------
// A shared-memory mbarrier counts one arrival (the thread that issues the copies, with the bytes it
// expects) and completes when those bytes have landed; waiters spin on its phase parity. Used only by
// the tensor-map path, which the host enables on sm_90 alone.

__device__ __forceinline__ void MbarInit(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(SharedAddress(bar)) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void MbarInval(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];\n" ::"r"(SharedAddress(bar)) : "memory");
#endif
}

// Arrives on `bar` and adds `bytes` to the transaction count its current phase waits for.
__device__ __forceinline__ void MbarArriveExpect(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(SharedAddress(bar)), "r"(bytes)
               : "memory");
#endif
}

// Blocks until the phase with parity `parity` of `bar` has completed.
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "MBAR_WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra MBAR_WAIT_%=;\n"
      "}\n" ::"r"(SharedAddress(bar)),
      "r"(parity)
      : "memory");
#endif
}

// Orders this thread's earlier generic-proxy shared-memory accesses before later async-proxy (TMA)
// ones: a stage that threads wrote (zero fill) is then safe to overwrite with a box copy.
__device__ __forceinline__ void FenceProxyAsyncShared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// One box of a 2-D tensor map (coordinates: column, row) to shared memory, completing on `bar`;
// evict-first in L2 like CpAsync16.
// `map` must live in param (a __grid_constant__ kernel argument), constant or global memory.
__device__ __forceinline__ void TmaLoad2d(void* smem_dst, const CUtensorMap* map, int col, int row, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(SharedAddress(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(SharedAddress(bar)), "l"(L2EvictFirstPolicy())
      : "memory");
#endif
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses (16 bytes each) of matrix i.
// Lane l receives element (row l/4, cols 2(l%4), 2(l%4)+1) of each matrix in r[i].
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(smem_row)));
}

// The same, transposed: lane l receives elements (rows 2(l%4), 2(l%4)+1; col l/4) of each matrix.
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(smem_row)));
}

// c += A * B for one 16x8 tile, bf16 inputs, f32 accumulation.
__device__ __forceinline__ void MmaBf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a bf16x2 register (lo in the low half: the lower column index).
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// x = hi + lo with hi = bf16(x) and lo = bf16(x - hi): a probability carried through a bf16 MMA in two
// parts keeps ~16 mantissa bits instead of 8.
__device__ __forceinline__ void SplitBf16(float x0, float x1, uint32_t* hi, uint32_t* lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
  const float2 hf = __bfloat1622float2(h);
  *hi = *reinterpret_cast<const uint32_t*>(&h);
  *lo = PackBf16(x0 - hf.x, x1 - hf.y);
}

// 2^x with one MUFU.EX2 (inputs below -126 flush to +0; -inf gives +0): exp2f without the
// denormal-range fix-up it compiles to outside --use_fast_math. For softmax probabilities, whose
// values below 2^-126 do not matter.
__device__ __forceinline__ float Exp2Ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Programmatic dependent launch. A kernel launched with the programmatic-serialization attribute may
// start while its predecessor in the stream still runs; WaitForPrerequisiteGrids blocks until that
// predecessor has completed and its writes are visible (a no-op without the attribute).
// AllowDependentLaunch lets the next kernel of the stream start launching early.
__device__ __forceinline__ void WaitForPrerequisiteGrids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void AllowDependentLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace needle::kernels::detail
