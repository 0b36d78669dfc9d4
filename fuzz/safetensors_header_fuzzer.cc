// Fuzz target: ParseSafetensorsHeader (engine/safetensors.h) on arbitrary bytes taken as a whole
// safetensors file. The parser must never read outside the buffer (ASan), never hit undefined
// behaviour (UBSan), and either refuse with a non-empty INVALID_ARGUMENT naming the source, or return
// a header whose every tensor lies inside the data section, has offsets consistent with its shape
// and dtype, and overlaps no other tensor. Every byte of every accepted tensor is read, so a header
// that points outside the file shows up as an ASan report.
#include <cstddef>
#include <cstdint>

#include "engine/safetensors.h"
#include "fuzz/fuzz_check.h"

namespace {

using needle::engine::DTypeSize;
using needle::engine::SafetensorsHeader;
using needle::engine::TensorInfo;

// Product of the dims, or -1 when it exceeds `limit` (the parser caps sizes at the file size).
int64_t BoundedNumel(const TensorInfo& t, uint64_t limit) {
  uint64_t n = 1;
  for (int64_t d : t.shape) {
    NEEDLE_FUZZ_CHECK(d >= 0);
    if (d == 0) return 0;
  }
  for (int64_t d : t.shape) {
    if (n > limit / static_cast<uint64_t>(d)) return -1;
    n *= static_cast<uint64_t>(d);
  }
  return static_cast<int64_t>(n);
}

volatile unsigned sink;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<SafetensorsHeader> header = needle::engine::ParseSafetensorsHeader(data, size, "fuzz.safetensors");
  if (!header.ok()) {
    NEEDLE_FUZZ_CHECK(absl::IsInvalidArgument(header.status()));
    NEEDLE_FUZZ_CHECK(header.status().message().find("fuzz.safetensors") != absl::string_view::npos);
    return 0;
  }
  NEEDLE_FUZZ_CHECK(header->data_start >= 8 && header->data_start <= size);
  const uint64_t data_size = size - header->data_start;
  const uint8_t* section = data + header->data_start;
  uint64_t prev_end = 0;
  uint64_t prev_begin = 0;
  unsigned checksum = 0;
  for (const TensorInfo& t : header->tensors) {
    NEEDLE_FUZZ_CHECK(t.data_begin <= t.data_end && t.data_end <= data_size);
    const int64_t numel = BoundedNumel(t, data_size);
    NEEDLE_FUZZ_CHECK(numel >= 0);
    NEEDLE_FUZZ_CHECK(t.nbytes() == static_cast<uint64_t>(numel) * static_cast<uint64_t>(DTypeSize(t.dtype)));
    NEEDLE_FUZZ_CHECK(t.numel() == numel);
    // Sorted by begin; tensors with bytes never overlap.
    NEEDLE_FUZZ_CHECK(t.data_begin >= prev_begin);
    prev_begin = t.data_begin;
    if (t.nbytes() > 0) {
      NEEDLE_FUZZ_CHECK(t.data_begin >= prev_end);
      prev_end = t.data_end;
    }
    for (uint64_t i = t.data_begin; i < t.data_end; ++i) checksum += section[i];
  }
  sink = checksum;  // keeps the reads from being optimised away
  return 0;
}
