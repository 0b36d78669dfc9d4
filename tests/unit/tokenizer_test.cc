// The byte tokenizer, UTF-8 validation and repair, and the incremental detokenizer. Byte sequences
// and their expected verdicts come from the Unicode Standard's Table 3-7 (well-formed sequences) and
// Table 3-8 (U+FFFD for maximal subparts).
#include "engine/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace needle::engine {
namespace {

using ::testing::HasSubstr;

const std::string kFffd = "\xEF\xBF\xBD";
const std::string kGrin = "\xF0\x9F\x98\x80";  // U+1F600

void ExpectRejectedAt(absl::string_view text, size_t offset) {
  ByteTokenizer tok(256);
  auto ids = tok.Encode(text);
  ASSERT_FALSE(ids.ok());
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(ids.status().message()),
              HasSubstr("byte offset " + std::to_string(offset) + " "));
}

TEST(ByteTokenizer, EncodesEachByteAsItsId) {
  ByteTokenizer tok(259);
  const std::string text = "h\xC3\xA9" + kGrin;  // "hé" + U+1F600
  auto ids = tok.Encode(text);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, (std::vector<int32_t>{0x68, 0xC3, 0xA9, 0xF0, 0x9F, 0x98, 0x80}));
  std::string back;
  for (int32_t id : *ids) back += tok.TokenBytes(id);
  EXPECT_EQ(back, text);
  auto empty = tok.Encode("");
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
}

TEST(ByteTokenizer, TokenBytesOfSpecialAndOutOfRangeIds) {
  ByteTokenizer tok(259);  // 256..258: bos/eos/pad of a synthetic model
  EXPECT_EQ(tok.TokenBytes(65), "A");
  EXPECT_EQ(tok.TokenBytes(0), std::string(1, '\0'));
  EXPECT_EQ(tok.TokenBytes(255), "\xFF");
  EXPECT_EQ(tok.TokenBytes(256), "");
  EXPECT_EQ(tok.TokenBytes(258), "");
  EXPECT_EQ(tok.TokenBytes(100000), "");
  EXPECT_EQ(tok.TokenBytes(-1), "");
  ByteTokenizer small(100);
  EXPECT_EQ(small.TokenBytes(99), "c");
  EXPECT_EQ(small.TokenBytes(100), "");
}

TEST(ByteTokenizer, IdsMustFitTheVocabulary) {
  ByteTokenizer tok(100);  // bytes 0..99 only
  auto ok = tok.Encode("abc");  // 97, 98, 99
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(*ok, (std::vector<int32_t>{97, 98, 99}));
  auto bad = tok.Encode("abcd");  // 'd' = 100
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("byte offset 3"));
}

TEST(ByteTokenizer, RejectsInvalidUtf8WithTheOffset) {
  ExpectRejectedAt("ab\xC0\x80", 2);       // overlong NUL
  ExpectRejectedAt("x\xED\xA0\x80y", 1);   // surrogate U+D800
  ExpectRejectedAt("\xF5\x80\x80\x80", 0); // would be above U+10FFFF
  ExpectRejectedAt("abc\xE2\x82", 3);      // truncated U+20AC
  ExpectRejectedAt("ok\x80", 2);           // lone continuation byte
}

TEST(MakeTokenizer, ByteTokenizerForEveryModel) {
  ModelConfig config;
  config.vocab_size = 300;
  for (Architecture arch : {Architecture::kNsa, Architecture::kLlamaNsa, Architecture::kNsaPaper,
                            Architecture::kLlama}) {
    config.arch = arch;
    auto tok = MakeTokenizer(config);
    ASSERT_NE(tok, nullptr);
    EXPECT_STREQ(tok->name(), "byte");
    EXPECT_EQ(tok->TokenBytes(0x41), "A");
    EXPECT_EQ(tok->TokenBytes(299), "");
  }
}

TEST(Utf8, ValidityAtTheTableBoundaries) {
  EXPECT_TRUE(IsValidUtf8(""));
  EXPECT_TRUE(IsValidUtf8("\x7F"));
  EXPECT_TRUE(IsValidUtf8("\xC2\x80"));          // U+0080, the smallest two-byte
  EXPECT_FALSE(IsValidUtf8("\xC1\xBF"));         // overlong U+007F
  EXPECT_FALSE(IsValidUtf8("\xC0\x80"));         // overlong U+0000
  EXPECT_TRUE(IsValidUtf8("\xE0\xA0\x80"));      // U+0800
  EXPECT_FALSE(IsValidUtf8("\xE0\x9F\xBF"));     // overlong U+07FF
  EXPECT_TRUE(IsValidUtf8("\xED\x9F\xBF"));      // U+D7FF
  EXPECT_FALSE(IsValidUtf8("\xED\xA0\x80"));     // U+D800
  EXPECT_FALSE(IsValidUtf8("\xED\xBF\xBF"));     // U+DFFF
  EXPECT_TRUE(IsValidUtf8("\xEE\x80\x80"));      // U+E000
  EXPECT_TRUE(IsValidUtf8("\xEF\xBF\xBF"));      // U+FFFF
  EXPECT_TRUE(IsValidUtf8("\xF0\x90\x80\x80"));  // U+10000
  EXPECT_FALSE(IsValidUtf8("\xF0\x8F\xBF\xBF")); // overlong U+FFFF
  EXPECT_TRUE(IsValidUtf8("\xF4\x8F\xBF\xBF"));  // U+10FFFF
  EXPECT_FALSE(IsValidUtf8("\xF4\x90\x80\x80")); // U+110000
  EXPECT_FALSE(IsValidUtf8("\xF5\x80\x80\x80"));
  EXPECT_FALSE(IsValidUtf8("\xFF"));
  EXPECT_FALSE(IsValidUtf8("\xE2\x82"));         // truncated
  EXPECT_FALSE(IsValidUtf8("\xE2\x82\x41"));     // continuation missing
  EXPECT_TRUE(IsValidUtf8("a\xE2\x82\xAC" + kGrin));
}

TEST(Utf8, CompletePrefixHoldsBackOnlyAPossiblyIncompleteTail) {
  EXPECT_EQ(CompleteUtf8Prefix(""), 0u);
  EXPECT_EQ(CompleteUtf8Prefix("abc"), 3u);
  EXPECT_EQ(CompleteUtf8Prefix("a\xF0"), 1u);
  EXPECT_EQ(CompleteUtf8Prefix("a\xF0\x9F\x98"), 1u);
  EXPECT_EQ(CompleteUtf8Prefix("a" + kGrin), 5u);
  EXPECT_EQ(CompleteUtf8Prefix("a\xC0"), 2u);       // C0 never completes: nothing to wait for
  EXPECT_EQ(CompleteUtf8Prefix("a\xE2\x41"), 3u);   // broken sequence, already decided
  EXPECT_EQ(CompleteUtf8Prefix("a\xF4\x90"), 3u);   // can never be valid
  EXPECT_EQ(CompleteUtf8Prefix("a\xED\x9F"), 1u);   // could still be U+D7xx
}

TEST(Utf8, SanitizeReplacesEachMaximalSubpart) {
  EXPECT_EQ(SanitizeUtf8("plain"), "plain");
  EXPECT_EQ(SanitizeUtf8(kGrin), kGrin);
  // Unicode Table 3-8: 61 F1 80 80 E1 80 C2 62 80 63 80 BF 64.
  EXPECT_EQ(SanitizeUtf8("a\xF1\x80\x80\xE1\x80\xC2" "b\x80" "c\x80\xBF" "d"),
            "a" + kFffd + kFffd + kFffd + "b" + kFffd + "c" + kFffd + kFffd + "d");
  EXPECT_EQ(SanitizeUtf8("\xC0\x80"), kFffd + kFffd);                   // C0 starts nothing
  EXPECT_EQ(SanitizeUtf8("\xED\xA0\x80"), kFffd + kFffd + kFffd);       // ED A0 is not a prefix
  EXPECT_EQ(SanitizeUtf8("\xF4\x90\x80\x80"), kFffd + kFffd + kFffd + kFffd);
  EXPECT_EQ(SanitizeUtf8("x\xE2\x82y"), "x" + kFffd + "y");             // one subpart E2 82
  EXPECT_EQ(SanitizeUtf8("x\xF0\x9F\x98"), "x" + kFffd);                // truncated at the end
}

TEST(Detokenizer, HoldsASplitCharacterUntilItCompletes) {
  ByteTokenizer tok(259);
  Detokenizer d(&tok);
  d.Add('A');
  EXPECT_EQ(d.Take(), "A");
  d.Add(0xF0);
  EXPECT_EQ(d.Take(), "");
  d.Add(0x9F);
  d.Add(0x98);
  EXPECT_EQ(d.Take(), "");
  d.Add(256);  // a special token adds no bytes and does not disturb the pending character
  EXPECT_EQ(d.Take(), "");
  d.Add(0x80);
  EXPECT_EQ(d.Take(), kGrin);
  d.Add('!');
  EXPECT_EQ(d.Take(), "!");
  EXPECT_EQ(d.Flush(), "");
}

TEST(Detokenizer, FlushReplacesADanglingLeadByte) {
  ByteTokenizer tok(256);
  Detokenizer d(&tok);
  d.Add('o');
  d.Add('k');
  d.Add(0xE2);
  EXPECT_EQ(d.Take(), "ok");
  EXPECT_EQ(d.Flush(), kFffd);
  EXPECT_EQ(d.Flush(), "");
}

TEST(Detokenizer, TakeRepairsBytesThatCanNeverBecomeValid) {
  ByteTokenizer tok(256);
  Detokenizer d(&tok);
  d.Add(0xC0);
  d.Add('b');
  EXPECT_EQ(d.Take(), kFffd + "b");
  d.Add(0xE2);
  d.Add(0x82);
  EXPECT_EQ(d.Take(), "");
  d.Add('c');  // E2 82 c: the pending pair is now a broken sequence
  EXPECT_EQ(d.Take(), kFffd + "c");
}

}  // namespace
}  // namespace needle::engine
