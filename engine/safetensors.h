// The safetensors file format: a bounds-checked header parser, a memory-mapped reader for one file,
// an opener for a Hugging Face checkpoint directory (model.safetensors, or shards listed by
// model.safetensors.index.json), conversion of stored tensors to fp32, and writers (single file or
// sharded with an index). Knows nothing of model architectures or tensor names: mapping names to
// ModelWeights is engine/checkpoint.h's job.
//
// File layout: [u64 little-endian N][N bytes of JSON header][data section]. The header maps each
// tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets in bytes relative to the
// start of the data section; an optional "__metadata__" maps strings to strings. Nothing here trusts
// the file: every header is validated before any data byte is read, and errors name the file and the
// tensor. ParseSafetensorsHeader is a pure function over bytes so that it can be fuzzed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace needle::engine {

// Element types of the safetensors format. Every type the format defines is recognised, so that a
// checkpoint carrying e.g. an I64 buffer can still be opened and its extra tensors skipped; only
// kBF16, kF16 and kF32 can be read as (or written from) fp32.
enum class DType {
  kBool,
  kU8,
  kI8,
  kF8E5M2,
  kF8E4M3,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64,
};

absl::string_view DTypeName(DType dtype);  // the header spelling: "BF16", "F16", "F32", ...
int DTypeSize(DType dtype);                // bytes per element
absl::StatusOr<DType> DTypeFromName(absl::string_view name);  // header spelling only
bool IsFloatConvertible(DType dtype);                         // kBF16, kF16 or kF32
// Command-line spelling: "bf16", "fp16" or "fp32" (also the header spellings of those three).
absl::StatusOr<DType> ParseStorageDType(absl::string_view name);

// One tensor entry of a header.
struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t data_begin = 0;  // bytes, relative to the data section
  uint64_t data_end = 0;    // one past the last byte; data_end - data_begin = numel * DTypeSize

  int64_t numel() const;
  uint64_t nbytes() const { return data_end - data_begin; }
};

struct SafetensorsHeader {
  uint64_t data_start = 0;                      // file offset of the data section: 8 + N
  std::vector<TensorInfo> tensors;              // sorted by data_begin
  std::map<std::string, std::string> metadata;  // "__metadata__", if any
};

// Largest JSON header accepted (the reference implementation's limit).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

// Parses and validates the header of a whole safetensors file held in `file[0, size)`: length field,
// JSON syntax, every entry's dtype, shape and offsets (within the data section, consistent with
// shape and dtype, no two tensors overlapping). Holes between tensors are allowed. `source` names
// the file in errors. Never reads outside [file, file + size).
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* file, size_t size,
                                                         absl::string_view source);

// One read-only, memory-mapped safetensors file. Not copyable; the mapping lives as long as the object.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  // nullptr when absent.
  const TensorInfo* Find(absl::string_view name) const;
  // The stored bytes of `info` (which must come from this file): nbytes() bytes, little-endian.
  const uint8_t* Data(const TensorInfo& info) const { return base_ + header_.data_start + info.data_begin; }

  // Converts `info`'s elements to fp32 into out[0, numel). Errors (naming file and tensor) when the
  // dtype is not BF16, F16 or F32.
  absl::Status ReadFloat32(const TensorInfo& info, float* out) const;
  // The same by name, shaped as stored.
  absl::Status ReadFloat32(absl::string_view name, std::vector<int64_t>* shape,
                           std::vector<float>* data) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  const uint8_t* base_ = nullptr;  // the mapping, size_ bytes
  size_t size_ = 0;
  SafetensorsHeader header_;
  std::map<std::string, size_t, std::less<>> by_name_;  // name -> index into header_.tensors
};

inline constexpr char kSafetensorsSingleFile[] = "model.safetensors";
inline constexpr char kSafetensorsIndexFile[] = "model.safetensors.index.json";

// A checkpoint directory's tensors: model.safetensors if present (as Hugging Face prefers), else the
// shards named by model.safetensors.index.json ("weight_map": tensor name -> shard file name, a plain
// file name in the same directory). Every tensor the index names must be in its shard; a tensor found
// in two shards is an error.
class SafetensorsCheckpoint {
 public:
  struct Entry {
    const SafetensorsFile* file = nullptr;
    const TensorInfo* info = nullptr;
  };

  static absl::StatusOr<SafetensorsCheckpoint> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  // {nullptr, nullptr} when absent.
  Entry Find(absl::string_view name) const;
  std::vector<std::string> TensorNames() const;  // sorted
  size_t num_files() const { return files_.size(); }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, Entry, std::less<>> entries_;
};

// ---- Writing ----

// What a writer must know before any data is written: header offsets need every shape up front.
struct TensorEntry {
  std::string name;
  std::vector<int64_t> shape;
  int64_t numel() const;
};

// Produces tensor `index` (entries are produced in order, once each) as numel fp32 values: either a
// pointer into existing storage, or `scratch` filled and scratch.data() returned. The pointer must
// stay valid until the next call.
using TensorProducer = std::function<absl::StatusOr<const float*>(size_t index, std::vector<float>& scratch)>;

// Writes one .safetensors file at `path` (through path + ".tmp" and a rename), converting to `dtype`
// (kBF16, kF16 or kF32) with round-to-nearest-even. The header is padded with spaces to a multiple
// of 8 bytes and carries __metadata__ {"format": "pt"}. Tensors are laid out in entry order.
absl::Status WriteSafetensorsFile(const std::string& path, const std::vector<TensorEntry>& entries,
                                  DType dtype, const TensorProducer& produce);

// Writes a checkpoint directory's tensors: model.safetensors when max_shard_bytes is 0 or everything
// fits in one shard, else model-0000i-of-0000K.safetensors plus model.safetensors.index.json.
// Shards are filled greedily in entry order up to max_shard_bytes of tensor data; a tensor larger
// than that gets a shard of its own. Removes a stale single file or index of the other layout, so
// that the directory is unambiguous. Memory: one produced tensor plus a conversion buffer.
absl::Status WriteSafetensorsCheckpoint(const std::string& dir, const std::vector<TensorEntry>& entries,
                                        DType dtype, int64_t max_shard_bytes, const TensorProducer& produce);

// Convenience for tensors already in memory.
struct NamedTensorView {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;  // numel values, row-major
};
absl::Status WriteSafetensorsFile(const std::string& path, const std::vector<NamedTensorView>& tensors,
                                  DType dtype);
absl::Status WriteSafetensorsCheckpoint(const std::string& dir, const std::vector<NamedTensorView>& tensors,
                                        DType dtype, int64_t max_shard_bytes);

}  // namespace needle::engine
