// Safetensors reader/writer and the fp32 <-> bf16/fp16 conversions: round trips against hand-computed
// rounded values, sharding, and every malformed-file case naming the file and the tensor.
#include "engine/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/bf16.h"
#include "nlohmann/json.hpp"

namespace needle::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "needle_st_XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return (fs::path(path_) / name).string(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A safetensors file from a literal header and `data_bytes` data bytes (value 0x11).
void WriteRaw(const std::string& path, const std::string& header, size_t data_bytes,
              uint64_t header_len_override = 0) {
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = header_len_override ? header_len_override : header.size();
  for (int b = 0; b < 8; ++b) out.put(static_cast<char>(n >> (8 * b)));
  out << header << std::string(data_bytes, '\x11');
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3F80);
  EXPECT_EQ(FloatToBf16(-2.5f), 0xC020);
  EXPECT_EQ(FloatToBf16(1.00390625f), 0x3F80);                 // 1 + 2^-8: tie, 0x3F80 is even
  EXPECT_EQ(FloatToBf16(1.01171875f), 0x3F82);                 // 1 + 3*2^-8: tie, 0x3F81 odd -> up
  EXPECT_EQ(FloatToBf16(FloatFromBits(0x3F808001u)), 0x3F81);  // just above the tie -> up
  EXPECT_EQ(FloatToBf16(FloatFromBits(0x3F807FFFu)), 0x3F80);  // just below -> down
  EXPECT_EQ(FloatToBf16(3.14159265f), 0x4049);                 // 0x40490FDB: low half 0x0FDB < 0x8000
  EXPECT_EQ(FloatToBf16(0.1f), 0x3DCD);                        // 0x3DCCCCCD: low half 0xCCCD -> up
  EXPECT_EQ(Bf16ToFloat(0x3DCD), 0.10009765625f);              // (1 + 77/128) * 2^-4
  EXPECT_EQ(FloatToBf16(FLT_MAX), 0x7F80);                     // rounds up to +inf
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToBf16(FloatFromBits(1u)), 0x0000);  // smallest subnormal -> +0
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(FloatFromBits(0x7F800001u)))));  // payload only in low bits
}

TEST(Fp16, RoundsToNearestEven) {
  EXPECT_EQ(FloatToFp16(1.0f), 0x3C00);
  EXPECT_EQ(FloatToFp16(-2.0f), 0xC000);
  EXPECT_EQ(FloatToFp16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToFp16(65504.0f), 0x7BFF);
  EXPECT_EQ(FloatToFp16(65519.0f), 0x7BFF);
  EXPECT_EQ(FloatToFp16(65520.0f), 0x7C00);        // tie between 65504 (odd) and 65536 (inf)
  EXPECT_EQ(FloatToFp16(1.00048828125f), 0x3C00);  // 1 + 2^-11: tie -> even
  EXPECT_EQ(FloatToFp16(1.00146484375f), 0x3C02);  // 1 + 3*2^-11: tie -> even (up)
  EXPECT_EQ(FloatToFp16(0.1f), 0x2E66);            // round(0.1 * 2^14) = 1638 = 0x666 (+ exponent 0x2C00)
  EXPECT_EQ(FloatToFp16(std::ldexp(1.0f, -14)), 0x0400);     // smallest normal
  EXPECT_EQ(FloatToFp16(std::ldexp(1.0f, -24)), 0x0001);     // smallest subnormal
  EXPECT_EQ(FloatToFp16(std::ldexp(1.0f, -25)), 0x0000);     // tie -> even (0)
  EXPECT_EQ(FloatToFp16(std::ldexp(3.0f, -25)), 0x0002);     // 1.5 * 2^-24: tie -> even (2)
  EXPECT_EQ(FloatToFp16(std::ldexp(2047.0f, -25)), 0x0400);  // 1023.5 * 2^-24: tie -> 1024 = smallest normal
  EXPECT_EQ(Fp16ToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(Fp16ToFloat(0x03FF), std::ldexp(1023.0f, -24));
  EXPECT_EQ(Fp16ToFloat(0x7BFF), 65504.0f);
  EXPECT_EQ(Fp16ToFloat(0x2E66), 0.0999755859375f);
  EXPECT_TRUE(std::isinf(Fp16ToFloat(0xFC00)));
  EXPECT_TRUE(std::isnan(Fp16ToFloat(FloatToFp16(std::nanf("")))));
}

// Values and, per dtype, what must come back (hand-rounded).
const std::vector<float> kValues = {1.0f, -2.5f, 1.00390625f, 1.01171875f, 0.1f, 0.0f};
const std::vector<float> kAsBf16 = {1.0f, -2.5f, 1.0f, 1.015625f, 0.10009765625f, 0.0f};
const std::vector<float> kAsFp16 = {1.0f, -2.5f, 1.00390625f, 1.01171875f, 0.0999755859375f, 0.0f};

TEST(Safetensors, RoundTripsEachDType) {
  TempDir dir;
  const float scalar = 7.0f;
  for (auto [dtype, expected] :
       {std::pair{DType::kF32, kValues}, std::pair{DType::kBF16, kAsBf16}, std::pair{DType::kF16, kAsFp16}}) {
    const std::string path = dir / absl::StrCat("t_", DTypeName(dtype), ".safetensors");
    std::vector<NamedTensorView> tensors = {
        {"a.weight", {2, 3}, kValues.data()}, {"empty", {0, 4}, nullptr}, {"scalar", {}, &scalar}};
    ASSERT_TRUE(WriteSafetensorsFile(path, tensors, dtype).ok());

    auto file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    ASSERT_EQ((*file)->tensors().size(), 3u);
    const TensorInfo* a = (*file)->Find("a.weight");
    ASSERT_NE(a, nullptr);
    EXPECT_EQ(a->dtype, dtype);
    EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
    EXPECT_EQ(a->nbytes(), 6u * DTypeSize(dtype));
    std::vector<int64_t> shape;
    std::vector<float> data;
    ASSERT_TRUE((*file)->ReadFloat32("a.weight", &shape, &data).ok());
    ASSERT_EQ(data.size(), expected.size());
    for (size_t i = 0; i < data.size(); ++i) {
      EXPECT_EQ(FloatBits(data[i]), FloatBits(expected[i])) << DTypeName(dtype) << " element " << i;
    }
    ASSERT_TRUE((*file)->ReadFloat32("scalar", &shape, &data).ok());
    EXPECT_TRUE(shape.empty());
    ASSERT_EQ(data.size(), 1u);
    EXPECT_EQ(data[0], 7.0f);
    ASSERT_TRUE((*file)->ReadFloat32("empty", &shape, &data).ok());
    EXPECT_EQ(shape, (std::vector<int64_t>{0, 4}));
    EXPECT_TRUE(data.empty());
    EXPECT_EQ((*file)->metadata().at("format"), "pt");

    // The on-disk layout: 8-byte aligned data section, a's bytes first.
    const std::string bytes = ReadAll(path);
    uint64_t n = 0;
    for (int b = 7; b >= 0; --b) n = (n << 8) | static_cast<uint8_t>(bytes[b]);
    EXPECT_EQ((8 + n) % 8, 0u);
    if (dtype == DType::kBF16) {  // element 3 = 0x3F82, little-endian
      EXPECT_EQ(static_cast<uint8_t>(bytes[8 + n + 6]), 0x82);
      EXPECT_EQ(static_cast<uint8_t>(bytes[8 + n + 7]), 0x3F);
    }
  }
}

TEST(Safetensors, ShardedRoundTrip) {
  TempDir dir;
  std::vector<float> a(10), b(10), c(25);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i);
  for (size_t i = 0; i < b.size(); ++i) b[i] = -static_cast<float>(i) * 0.5f;
  for (size_t i = 0; i < c.size(); ++i) c[i] = static_cast<float>(i) * 0.25f;
  std::vector<NamedTensorView> tensors = {
      {"a", {10}, a.data()}, {"b", {2, 5}, b.data()}, {"c", {5, 5}, c.data()}};
  // 40 + 40 bytes fill shard 1 exactly; c (100 bytes) exceeds the limit and gets shard 2 alone.
  ASSERT_TRUE(WriteSafetensorsCheckpoint(dir.path(), tensors, DType::kF32, 80).ok());
  EXPECT_TRUE(fs::exists(dir / "model-00001-of-00002.safetensors"));
  EXPECT_TRUE(fs::exists(dir / "model-00002-of-00002.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "model.safetensors"));
  auto index = nlohmann::json::parse(ReadAll(dir / "model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], 180);
  EXPECT_EQ(index["weight_map"]["a"], "model-00001-of-00002.safetensors");
  EXPECT_EQ(index["weight_map"]["b"], "model-00001-of-00002.safetensors");
  EXPECT_EQ(index["weight_map"]["c"], "model-00002-of-00002.safetensors");

  auto ckpt = SafetensorsCheckpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ(ckpt->num_files(), 2u);
  EXPECT_EQ(ckpt->TensorNames(), (std::vector<std::string>{"a", "b", "c"}));
  for (const NamedTensorView& t : tensors) {
    auto e = ckpt->Find(t.name);
    ASSERT_NE(e.info, nullptr) << t.name;
    EXPECT_EQ(e.info->shape, t.shape);
    std::vector<float> got(static_cast<size_t>(e.info->numel()));
    ASSERT_TRUE(e.file->ReadFloat32(*e.info, got.data()).ok());
    for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], t.data[i]) << t.name << "[" << i << "]";
  }
  EXPECT_EQ(ckpt->Find("d").info, nullptr);

  // Rewriting as one file removes the index, so the directory has one meaning.
  ASSERT_TRUE(WriteSafetensorsCheckpoint(dir.path(), tensors, DType::kF32, 0).ok());
  EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  ckpt = SafetensorsCheckpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ(ckpt->num_files(), 1u);
}

// Opening `path` must fail with a message containing every one of `parts`.
void ExpectOpenError(const std::string& path, std::vector<std::string> parts) {
  auto file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok()) << path << " opened";
  const std::string msg(file.status().message());
  EXPECT_THAT(msg, HasSubstr(path));
  for (const std::string& p : parts) EXPECT_THAT(msg, HasSubstr(p));
}

TEST(SafetensorsErrors, TruncatedFile) {
  TempDir dir;
  std::vector<float> a(4, 1.0f), b(4, 2.0f);
  const std::string path = dir / "model.safetensors";
  ASSERT_TRUE(WriteSafetensorsFile(path, {{"first", {4}, a.data()}, {"model.norm.weight", {4}, b.data()}},
                                   DType::kF32)
                  .ok());
  fs::resize_file(path, fs::file_size(path) - 3);
  ExpectOpenError(path, {"tensor \"model.norm.weight\"", "data_offsets [16, 32]", "truncated"});
  fs::resize_file(path, 5);
  ExpectOpenError(path, {"5 bytes", "too short"});
  fs::resize_file(path, 0);
  ExpectOpenError(path, {"0 bytes"});
}

TEST(SafetensorsErrors, HeaderLongerThanFile) {
  TempDir dir;
  const std::string path = dir / "h.safetensors";
  WriteRaw(path, "{}", 0, /*header_len_override=*/1000);
  ExpectOpenError(path, {"header length 1000", "file size 10"});
  WriteRaw(path, "{}", 0, /*header_len_override=*/uint64_t{1} << 62);
  ExpectOpenError(path, {"header length", "limit"});
}

TEST(SafetensorsErrors, InvalidJson) {
  TempDir dir;
  const std::string path = dir / "j.safetensors";
  WriteRaw(path, "{\"w\": {\"dtype\": ", 0);
  ExpectOpenError(path, {"invalid JSON header"});
  WriteRaw(path, "[1, 2]  ", 0);
  ExpectOpenError(path, {"not an object"});
  WriteRaw(path, std::string(100, '[') + std::string(100, ']'), 0);
  ExpectOpenError(path, {"nested deeper"});
  WriteRaw(
      path,
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
      8);
  ExpectOpenError(path, {"\"w\" appears twice"});
}

TEST(SafetensorsErrors, BadEntries) {
  TempDir dir;
  const std::string path = dir / "e.safetensors";
  struct Case {
    std::string header;
    size_t data;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {R"({"w":{"dtype":"Q7","shape":[1],"data_offsets":[0,4]}})", 4, {"tensor \"w\"", "dtype \"Q7\""}},
      {R"({"w":{"shape":[1],"data_offsets":[0,4]}})", 4, {"tensor \"w\"", "dtype"}},
      {R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4, {"tensor \"w\"", "shape"}},
      {R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", 4, {"tensor \"w\"", "shape"}},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", 4, {"tensor \"w\"", "data_offsets"}},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", 4, {"tensor \"w\"", "reversed"}},
      // Out of range: 8 bytes claimed, 4 present.
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
       4,
       {"tensor \"w\"", "data_offsets [0, 8] exceed the data section (4 bytes"}},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}})",
       4,
       {"tensor \"w\"", "data_offsets"}},
      // Shape and offsets disagree: [2] of F32 is 8 bytes, the offsets span 4.
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})",
       8,
       {"tensor \"w\"", "span 4 bytes", "needs 8 bytes"}},
      {R"({"w":{"dtype":"BF16","shape":[4294967296,4294967296,4],"data_offsets":[0,4]}})",
       8,
       {"tensor \"w\"", "more than the file size"}},
      // Overlap: b starts inside a.
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       12,
       {"tensor \"b\"", "overlap tensor \"a\""}},
      {R"({"__metadata__":{"format":1}})", 0, {"__metadata__"}},
      {R"({"w":[1,2]})", 0, {"tensor \"w\"", "not a JSON object"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.header);
    WriteRaw(path, c.header, c.data);
    ExpectOpenError(path, c.expect);
  }
}

TEST(SafetensorsErrors, AcceptsValidCornerCases) {
  TempDir dir;
  const std::string path = dir / "ok.safetensors";
  // Metadata, a hole between tensors, a zero-size tensor, unknown extra keys, an I64 tensor.
  WriteRaw(
      path,
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1},)"
      R"("z":{"dtype":"F16","shape":[0],"data_offsets":[4,4]},"i":{"dtype":"I64","shape":[1],"data_offsets":[8,16]}})",
      16);
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->tensors().size(), 3u);
  const TensorInfo* i = (*file)->Find("i");
  ASSERT_NE(i, nullptr);
  std::vector<float> out(1);
  absl::Status s = (*file)->ReadFloat32(*i, out.data());
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("tensor \"i\""));
  EXPECT_THAT(std::string(s.message()), HasSubstr("I64"));
  EXPECT_THAT(std::string(s.message()), HasSubstr(path));
  std::vector<int64_t> shape;
  s = (*file)->ReadFloat32("missing", &shape, &out);
  EXPECT_TRUE(absl::IsNotFound(s)) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("\"missing\""));
}

TEST(SafetensorsErrors, SurvivesMutatedHeaders) {
  // Deterministic mutations of a valid file: parsing must return (ok or error), never crash, and an
  // accepted header must keep every tensor inside the data section.
  std::vector<float> a = {1, 2, 3, 4}, b = {5, 6};
  TempDir dir;
  const std::string path = dir / "seed.safetensors";
  ASSERT_TRUE(
      WriteSafetensorsFile(path, {{"alpha", {2, 2}, a.data()}, {"beta", {2}, b.data()}}, DType::kBF16).ok());
  const std::string original = ReadAll(path);
  uint64_t state = 12345;
  auto next = [&state] {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return state >> 33;
  };
  const char kAlphabet[] = "{}[],:\"0123456789-.eE FBI16328_x\\\x00\xff";
  int accepted = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string bytes = original;
    const int edits = 1 + static_cast<int>(next() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = next() % bytes.size();
      switch (next() % 3) {
        case 0:
          bytes[at] = kAlphabet[next() % (sizeof(kAlphabet) - 1)];
          break;
        case 1:
          bytes.erase(at, 1 + next() % 8);
          break;
        case 2:
          bytes.resize(at);
          break;
      }
      if (bytes.empty()) break;
    }
    auto h = ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "fuzz");
    if (!h.ok()) {
      EXPECT_THAT(std::string(h.status().message()), HasSubstr("fuzz")) << iter;
      continue;
    }
    ++accepted;
    for (const TensorInfo& t : h->tensors) {
      ASSERT_LE(h->data_start + t.data_end, bytes.size()) << iter;
      ASSERT_EQ(t.nbytes(), static_cast<uint64_t>(t.numel()) * DTypeSize(t.dtype)) << iter;
    }
  }
  EXPECT_GT(accepted, 0);  // some mutations (e.g. in the data section) keep the file valid
}

TEST(SafetensorsCheckpointErrors, IndexProblems) {
  TempDir dir;
  EXPECT_TRUE(absl::IsNotFound(SafetensorsCheckpoint::Open(dir.path()).status()));
  std::vector<float> a(4, 1.0f);
  ASSERT_TRUE(WriteSafetensorsFile(dir / "s1.safetensors", {{"a", {4}, a.data()}}, DType::kF32).ok());
  auto write_index = [&](const std::string& text) {
    std::ofstream(dir / "model.safetensors.index.json") << text;
  };
  write_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})");
  auto c = SafetensorsCheckpoint::Open(dir.path());
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("tensor \"b\""));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("s1.safetensors"));
  write_index(R"({"weight_map": {"a": "../s1.safetensors"}})");
  c = SafetensorsCheckpoint::Open(dir.path());
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("not a plain file name"));
  write_index(R"({"weight_map": {"a": "s2.safetensors"}})");
  c = SafetensorsCheckpoint::Open(dir.path());
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("s2.safetensors"));
  write_index(R"({"weight_map": )");
  c = SafetensorsCheckpoint::Open(dir.path());
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("model.safetensors.index.json"));
  ASSERT_TRUE(WriteSafetensorsFile(dir / "s2.safetensors", {{"a", {4}, a.data()}}, DType::kF32).ok());
  write_index(R"({"weight_map": {"a": "s1.safetensors", "x": "s2.safetensors"}})");
  c = SafetensorsCheckpoint::Open(dir.path());
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("\"a\" is in both"));
  write_index(R"({"weight_map": {"a": "s1.safetensors"}})");
  c = SafetensorsCheckpoint::Open(dir.path());
  ASSERT_TRUE(c.ok()) << c.status();
}

TEST(SafetensorsWriter, RejectsBadInput) {
  TempDir dir;
  std::vector<float> a(4, 1.0f);
  EXPECT_FALSE(WriteSafetensorsFile(dir / "x.safetensors", {{"a", {4}, a.data()}}, DType::kI32).ok());
  EXPECT_FALSE(
      WriteSafetensorsFile(dir / "x.safetensors", {{"a", {4}, a.data()}, {"a", {4}, a.data()}}, DType::kF32)
          .ok());
  EXPECT_FALSE(WriteSafetensorsFile(dir / "x.safetensors", {{"a", {-4}, a.data()}}, DType::kF32).ok());
  EXPECT_FALSE(fs::exists(dir / "x.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "x.safetensors.tmp"));
}

}  // namespace
}  // namespace needle::engine
