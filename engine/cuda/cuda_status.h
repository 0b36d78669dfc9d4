// CUDA and cuBLASLt errors as absl::Status for the CUDA executor: every runtime call and every kernel
// launch in engine/cuda/ goes through NEEDLE_CUDA_RETURN_IF_ERROR, which turns a cudaError_t into an
// INTERNAL status naming the call. Owns only the conversion; it never aborts, logs or retries.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace needle::engine::cuda {

// INTERNAL "<call>: <cudaErrorName> (<description>)".
inline absl::Status CudaError(const char* call, cudaError_t err) {
  return absl::InternalError(absl::StrCat(call, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

// Prefixes a non-OK status's message with `context` (say, "layer 3"); OK stays OK.
inline absl::Status WithContext(const absl::Status& status, const std::string& context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

}  // namespace needle::engine::cuda

// Evaluates `expr` (a cudaError_t: a runtime call or a kernels:: launcher); on failure returns
// CudaError("expr", err) from the enclosing function, which must return absl::Status (or StatusOr).
#define NEEDLE_CUDA_RETURN_IF_ERROR(expr)                                               \
  do {                                                                                  \
    const cudaError_t needle_cuda_err_ = (expr);                                        \
    if (needle_cuda_err_ != cudaSuccess) {                                              \
      return ::needle::engine::cuda::CudaError(#expr, needle_cuda_err_);                \
    }                                                                                   \
  } while (0)
