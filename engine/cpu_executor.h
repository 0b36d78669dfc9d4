// CpuExecutor: the fp32 reference implementation of a step, on the CPU. It owns the cache memory the
// KvCacheManager's page ids index (layouts in docs/kv-cache.md) and runs every op through
// kernels/reference, so the GPU kernels are tested against the same definitions. Slow by design:
// the demo model and the tests' tiny models run on it; it is what CI serves with.
#pragma once

#include <memory>
#include <vector>

#include "engine/executor.h"
#include "engine/kv_cache.h"
#include "engine/weights.h"
#include "kernels/reference/attention_ref.h"
#include "kernels/reference/kv_rows.h"

namespace needle::engine {

class CpuExecutor final : public Executor {
 public:
  // `weights` must outlive the executor. Allocates the pools `cache` describes.
  CpuExecutor(const ModelWeights& weights, const KvCacheConfig& cache);

  const char* name() const override { return "cpu"; }
  absl::Status Run(const StepPlan& plan, StepOutput* out) override;

 private:
  // K and V storage of one pool: [pages][layers][kv_heads][rows_per_page][d].
  struct PoolStore {
    std::vector<float> k, v;
    int rows_per_page = 0;
  };

  absl::Status RunSequence(const SeqStep& step, float* logits);
  kernels::reference::KvRows Rows(const PoolStore& store, const std::vector<int32_t>& table, int layer, int head,
                                  bool value, int ring_pages) const;
  float* RowPtr(PoolStore& store, const std::vector<int32_t>& table, int layer, int head, bool value,
                int64_t row, int ring_pages);

  const ModelWeights& w_;
  const ModelConfig& c_;
  CacheLayout layout_;
  kernels::reference::NsaGeometry geo_;
  PoolStore pools_[kNumPools];
};

}  // namespace needle::engine
