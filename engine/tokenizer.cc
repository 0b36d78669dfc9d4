// The byte-level tokenizer, the UTF-8 validation and repair the engine applies to text going in and
// out, and the incremental detokenizer. UTF-8 well-formedness follows the Unicode Standard's table
// of well-formed byte sequences (ch. 3, Table 3-7); repair replaces each maximal subpart of an
// ill-formed sequence with one U+FFFD, the practice the Unicode Standard recommends and WHATWG
// requires. Nothing here allocates per byte or knows about requests.
#include "engine/tokenizer.h"

#include "absl/strings/str_cat.h"

namespace needle::engine {
namespace {

constexpr absl::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

enum class Utf8Kind {
  kValid,      // a well-formed character of `len` bytes
  kInvalid,    // `len` bytes form a maximal subpart of an ill-formed sequence
  kTruncated,  // the `len` bytes up to the end of the input could still become a character
};

struct Utf8Unit {
  Utf8Kind kind;
  size_t len;
};

// Classifies the bytes of `s` starting at `i` (i < s.size()).
Utf8Unit ScanUnit(absl::string_view s, size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return {Utf8Kind::kValid, 1};
  // Trailing bytes after the lead; the second byte's range excludes overlongs (E0, F0),
  // surrogates (ED) and code points above U+10FFFF (F4). Later bytes are always 80..BF.
  int trailing = 0;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    trailing = 1;
  } else if (b0 == 0xE0) {
    trailing = 2;
    lo = 0xA0;
  } else if (b0 == 0xED) {
    trailing = 2;
    hi = 0x9F;
  } else if (b0 >= 0xE1 && b0 <= 0xEF) {
    trailing = 2;
  } else if (b0 == 0xF0) {
    trailing = 3;
    lo = 0x90;
  } else if (b0 == 0xF4) {
    trailing = 3;
    hi = 0x8F;
  } else if (b0 >= 0xF1 && b0 <= 0xF3) {
    trailing = 3;
  } else {
    return {Utf8Kind::kInvalid, 1};  // 80..C1 and F5..FF never start a character
  }
  size_t n = 1;
  for (int k = 0; k < trailing; ++k, ++n) {
    if (i + n >= s.size()) return {Utf8Kind::kTruncated, n};
    const auto b = static_cast<unsigned char>(s[i + n]);
    if (b < (k == 0 ? lo : 0x80) || b > (k == 0 ? hi : 0xBF)) return {Utf8Kind::kInvalid, n};
  }
  return {Utf8Kind::kValid, n};
}

// Offset of the first byte that does not start a well-formed character, or s.size().
size_t FirstInvalidOffset(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    Utf8Unit u = ScanUnit(s, i);
    if (u.kind != Utf8Kind::kValid) return i;
    i += u.len;
  }
  return i;
}

}  // namespace

absl::StatusOr<std::vector<int32_t>> ByteTokenizer::Encode(absl::string_view text) const {
  size_t bad = FirstInvalidOffset(text);
  if (bad != text.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("text is not valid UTF-8 at byte offset ", bad, " (byte 0x",
                     absl::Hex(static_cast<unsigned char>(text[bad]), absl::kZeroPad2), ")"));
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    const int32_t id = static_cast<unsigned char>(text[i]);
    if (id >= vocab_size_) {
      return absl::InvalidArgumentError(absl::StrCat("byte 0x", absl::Hex(id, absl::kZeroPad2),
                                                     " at byte offset ", i,
                                                     " has no token: the vocabulary has ",
                                                     vocab_size_, " ids"));
    }
    ids.push_back(id);
  }
  return ids;
}

std::string ByteTokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id > 255 || id >= vocab_size_) return "";
  return std::string(1, static_cast<char>(id));
}

std::unique_ptr<Tokenizer> MakeTokenizer(const ModelConfig& config) {
  // Every supported checkpoint is served with the byte tokenizer for now; clients with a real
  // vocabulary send token ids.
  return std::make_unique<ByteTokenizer>(config.vocab_size);
}

bool IsValidUtf8(absl::string_view s) { return FirstInvalidOffset(s) == s.size(); }

size_t CompleteUtf8Prefix(absl::string_view s) {
  // Only the last unit can be truncated, and it starts at most 3 bytes from the end; but a unit's
  // boundaries depend on what precedes it, so scan from the start (callers pass short buffers).
  size_t i = 0;
  while (i < s.size()) {
    Utf8Unit u = ScanUnit(s, i);
    if (u.kind == Utf8Kind::kTruncated) return i;
    i += u.len;
  }
  return s.size();
}

std::string SanitizeUtf8(absl::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    Utf8Unit u = ScanUnit(s, i);
    if (u.kind == Utf8Kind::kValid) {
      out.append(s.data() + i, u.len);
    } else {
      out.append(kReplacementChar.data(), kReplacementChar.size());
    }
    i += u.len;
  }
  return out;
}

// Take() repairs what it returns as well: an ill-formed subpart before the held-back tail can no
// longer become valid, and every emitted delta must be valid UTF-8 (protobuf strings require it).
std::string Detokenizer::Take() {
  const size_t complete = CompleteUtf8Prefix(pending_);
  std::string out = SanitizeUtf8(absl::string_view(pending_).substr(0, complete));
  pending_.erase(0, complete);
  return out;
}

std::string Detokenizer::Flush() {
  std::string out = SanitizeUtf8(pending_);
  pending_.clear();
  return out;
}

}  // namespace needle::engine
