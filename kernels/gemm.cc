// cuBLASLt GEMM wrapper. Row-major y [rows][out] = x [rows][in] · W^T is computed as the column-major
// product D (out x rows) = op_T(A) · B with A = W viewed column-major as (in x out, ld = w_stride) and
// B = x viewed column-major as (in x rows, ld = x_stride): the "TN" layout every cuBLASLt bf16 kernel
// supports. Descriptors are created and destroyed per call.
#include "kernels/gemm.h"

#include <cublasLt.h>

namespace needle::kernels {
namespace {

cudaError_t ToCuda(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return cudaSuccess;
    case CUBLAS_STATUS_INVALID_VALUE:
      return cudaErrorInvalidValue;
    case CUBLAS_STATUS_NOT_SUPPORTED:
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return cudaErrorNotSupported;
    case CUBLAS_STATUS_ALLOC_FAILED:
      return cudaErrorMemoryAllocation;
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return cudaErrorInitializationError;
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return cudaErrorLaunchFailure;
    default:
      return cudaErrorUnknown;
  }
}

// Largest power of two (<= 256) dividing the address: what cuBLASLt may assume about alignment.
uint32_t Alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && (a % align) != 0) align >>= 1;
  return align;
}

// Destroys whatever descriptors were created, on every return path.
struct Descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Descriptors() {
    if (pref != nullptr) cublasLtMatmulPreferenceDestroy(pref);
    if (d != nullptr) cublasLtMatrixLayoutDestroy(d);
    if (b != nullptr) cublasLtMatrixLayoutDestroy(b);
    if (a != nullptr) cublasLtMatrixLayoutDestroy(a);
    if (op != nullptr) cublasLtMatmulDescDestroy(op);
  }
};

#define NEEDLE_CUBLAS_TRY(expr)                            \
  do {                                                     \
    const cublasStatus_t needle_status_ = (expr);          \
    if (needle_status_ != CUBLAS_STATUS_SUCCESS) return ToCuda(needle_status_); \
  } while (0)

}  // namespace

size_t GemmWorkspaceBytes() { return size_t{32} << 20; }

cudaError_t LaunchGemm(cublasLtHandle_t handle, const GemmParams& p, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream) {
  if (p.rows == 0 || p.out == 0) return cudaSuccess;
  if (handle == nullptr || p.rows < 0 || p.out < 0 || p.in <= 0 || p.x == nullptr || p.w == nullptr ||
      p.y == nullptr || p.x_stride < p.in || p.w_stride < p.in || p.y_stride < p.out ||
      (p.bias != nullptr && p.y_type != GemmOutput::kBf16) || (workspace == nullptr && workspace_bytes != 0)) {
    return cudaErrorInvalidValue;
  }
  const cudaDataType_t out_type = p.y_type == GemmOutput::kBf16 ? CUDA_R_16BF : CUDA_R_32F;
  Descriptors desc;
  NEEDLE_CUBLAS_TRY(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  NEEDLE_CUBLAS_TRY(
      cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)));
  NEEDLE_CUBLAS_TRY(
      cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)));
  if (p.bias != nullptr) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t bias_type = CUDA_R_16BF;
    NEEDLE_CUBLAS_TRY(
        cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    NEEDLE_CUBLAS_TRY(
        cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias, sizeof(p.bias)));
    NEEDLE_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                                     sizeof(bias_type)));
  }
  NEEDLE_CUBLAS_TRY(cublasLtMatrixLayoutCreate(&desc.a, CUDA_R_16BF, p.in, p.out, p.w_stride));
  NEEDLE_CUBLAS_TRY(cublasLtMatrixLayoutCreate(&desc.b, CUDA_R_16BF, p.in, p.rows, p.x_stride));
  NEEDLE_CUBLAS_TRY(cublasLtMatrixLayoutCreate(&desc.d, out_type, p.out, p.rows, p.y_stride));

  NEEDLE_CUBLAS_TRY(cublasLtMatmulPreferenceCreate(&desc.pref));
  const uint64_t ws = workspace_bytes;
  NEEDLE_CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                         sizeof(ws)));
  const uint32_t align_a = Alignment(p.w), align_b = Alignment(p.x), align_d = Alignment(p.y);
  NEEDLE_CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                         &align_a, sizeof(align_a)));
  NEEDLE_CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                         &align_b, sizeof(align_b)));
  NEEDLE_CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                         &align_d, sizeof(align_d)));
  NEEDLE_CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                         &align_d, sizeof(align_d)));

  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  NEEDLE_CUBLAS_TRY(cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.d, desc.d, desc.pref, 1,
                                                   &heuristic, &found));
  if (found == 0) return cudaErrorNotSupported;
  const float alpha = 1.0f, beta = p.accumulate ? 1.0f : 0.0f;
  NEEDLE_CUBLAS_TRY(cublasLtMatmul(handle, desc.op, &alpha, p.w, desc.a, p.x, desc.b, &beta, p.y, desc.d, p.y,
                                   desc.d, &heuristic.algo, workspace, workspace_bytes, stream));
  return cudaSuccess;
}

}  // namespace needle::kernels
