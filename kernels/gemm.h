// Thin cuBLASLt wrapper for every linear layer: y = x · W^T (+ bias) (+ y), bf16 inputs, fp32
// accumulation, bf16 or fp32 output, for PyTorch-layout weights W [out][in] and a batch of rows. The
// caller owns the cuBLASLt handle and the workspace; this file owns only the descriptor setup and the
// algorithm choice (cuBLASLt's first heuristic, per call).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

// Same declaration as <cublasLt.h>, so that this header needs no cuBLAS include.
struct cublasLtContext;
typedef struct cublasLtContext* cublasLtHandle_t;

namespace needle::kernels {

enum class GemmOutput { kBf16, kFp32 };

struct GemmParams {
  int64_t rows = 0;  // tokens
  int64_t in = 0;    // input features
  int64_t out = 0;   // output features
  const __nv_bfloat16* x = nullptr;     // bf16 [rows][x_stride], first `in` columns
  int64_t x_stride = 0;
  const __nv_bfloat16* w = nullptr;     // bf16 [out][w_stride], first `in` columns (PyTorch layout)
  int64_t w_stride = 0;
  const __nv_bfloat16* bias = nullptr;  // bf16 [out] or nullptr; only with GemmOutput::kBf16
  void* y = nullptr;                    // [rows][y_stride], first `out` columns, of `y_type`
  int64_t y_stride = 0;
  GemmOutput y_type = GemmOutput::kBf16;
  bool accumulate = false;              // y += x · W^T (the residual add); else y = x · W^T
};

// Workspace the wrapper is tuned for (cuBLASLt's recommendation for Hopper).
size_t GemmWorkspaceBytes();

// Errors: cudaErrorInvalidValue for bad shapes, cudaErrorNotSupported when cuBLASLt offers no
// algorithm, otherwise cuBLAS statuses mapped to the nearest cudaError_t.
cudaError_t LaunchGemm(cublasLtHandle_t handle, const GemmParams& params, void* workspace,
                       size_t workspace_bytes, cudaStream_t stream);

}  // namespace needle::kernels
