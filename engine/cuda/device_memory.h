// Owning handles for the CUDA executor's memory: DeviceBuffer (cudaMalloc) and PinnedBuffer
// (cudaMallocHost, for the step plan's single upload). Move-only; freed in the destructor. Allocation
// failures come back as INTERNAL/RESOURCE_EXHAUSTED statuses naming what was being allocated. They
// never initialise memory and never synchronise.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_status.h"

namespace needle::engine::cuda {

namespace internal {

inline absl::Status AllocError(const char* kind, const char* what, size_t bytes, cudaError_t err) {
  const std::string msg = absl::StrCat(kind, " of ", bytes, " bytes for ", what, ": ", cudaGetErrorName(err), " (",
                                       cudaGetErrorString(err), ")");
  return err == cudaErrorMemoryAllocation ? absl::ResourceExhaustedError(msg) : absl::InternalError(msg);
}

}  // namespace internal

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      Free();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  ~DeviceBuffer() { Free(); }

  // Frees what was held and allocates `bytes` (at least 1). `what` names the buffer in errors.
  absl::Status Allocate(size_t bytes, const char* what) {
    Free();
    const size_t n = bytes > 0 ? bytes : 1;
    const cudaError_t err = cudaMalloc(&ptr_, n);
    if (err != cudaSuccess) {
      ptr_ = nullptr;
      cudaGetLastError();  // an allocation failure is not sticky; clear it
      return internal::AllocError("cudaMalloc", what, n, err);
    }
    bytes_ = n;
    return absl::OkStatus();
  }
  void Free() {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }

  void* get() const { return ptr_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  PinnedBuffer(PinnedBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
      Free();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  ~PinnedBuffer() { Free(); }

  absl::Status Allocate(size_t bytes, const char* what) {
    Free();
    const size_t n = bytes > 0 ? bytes : 1;
    const cudaError_t err = cudaMallocHost(&ptr_, n);
    if (err != cudaSuccess) {
      ptr_ = nullptr;
      cudaGetLastError();
      return internal::AllocError("cudaMallocHost", what, n, err);
    }
    bytes_ = n;
    return absl::OkStatus();
  }
  void Free() {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }

  char* get() const { return static_cast<char*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace needle::engine::cuda
