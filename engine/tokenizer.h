// Tokenizers: text <-> token ids, and the incremental detokenizer that turns a stream of ids into
// UTF-8-complete text deltas. needle's synthetic models use the byte-level tokenizer (ids 0..255 are
// bytes); every model also accepts token ids directly.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/model_config.h"

namespace needle::engine {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual const char* name() const = 0;
  // INVALID_ARGUMENT when the text can't be encoded (e.g. not valid UTF-8).
  virtual absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text) const = 0;
  // The raw bytes a token stands for ("" for special tokens and ids without text).
  virtual std::string TokenBytes(int32_t id) const = 0;
};

// Ids 0..255 are the bytes 0..255; bos/eos/pad and any id >= 256 decode to nothing.
class ByteTokenizer final : public Tokenizer {
 public:
  explicit ByteTokenizer(int vocab_size) : vocab_size_(vocab_size) {}
  const char* name() const override { return "byte"; }
  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text) const override;
  std::string TokenBytes(int32_t id) const override;

 private:
  int vocab_size_;
};

std::unique_ptr<Tokenizer> MakeTokenizer(const ModelConfig& config);

// Whether `s` is valid UTF-8 (no overlongs, no surrogates, nothing above U+10FFFF).
bool IsValidUtf8(absl::string_view s);
// Length of the longest prefix of `s` that does not end inside a possibly incomplete UTF-8 sequence.
size_t CompleteUtf8Prefix(absl::string_view s);

// Accumulates token bytes; Take() returns the text that is complete UTF-8 so far, holding back the
// bytes of a partial character; Flush() returns the rest with invalid bytes replaced by U+FFFD.
class Detokenizer {
 public:
  explicit Detokenizer(const Tokenizer* tokenizer) : tokenizer_(tokenizer) {}
  void Add(int32_t id) { pending_ += tokenizer_->TokenBytes(id); }
  std::string Take();
  std::string Flush();

 private:
  const Tokenizer* tokenizer_;
  std::string pending_;
};

// Replaces every invalid byte sequence with U+FFFD.
std::string SanitizeUtf8(absl::string_view s);

}  // namespace needle::engine
