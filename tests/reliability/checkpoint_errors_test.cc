// needle-server on broken checkpoint directories (label e2e). Each case writes a good tiny-llama
// checkpoint with engine/checkpoint.h, breaks it (byte surgery on model.safetensors, or an edited
// config.json), runs `needle-server --model DIR`, and expects a clean failure: exit status 1, the
// "cannot start the engine" line naming the file (and the tensor or field where there is one), and
// no crash, sanitizer report or uncaught exception. docs/reliability.md lists the cases.
#include <signal.h>
#include <stdlib.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "engine/checkpoint.h"
#include "engine/presets.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/e2e/subprocess.h"

namespace needle::reliability {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;
using ojson = nlohmann::ordered_json;

constexpr char kNorm[] = "model.norm.weight";
constexpr char kEmbed[] = "model.embed_tokens.weight";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

std::string LengthPrefix(uint64_t n) {
  std::string p(8, '\0');
  for (int b = 0; b < 8; ++b) p[b] = static_cast<char>(n >> (8 * b));
  return p;
}

// A safetensors file split into its JSON header and its data section.
struct Safetensors {
  ojson header;
  std::string data;

  static Safetensors Read(const std::string& path) {
    const std::string bytes = ReadFile(path);
    uint64_t n = 0;
    for (int b = 7; b >= 0; --b) n = (n << 8) | static_cast<uint8_t>(bytes[b]);
    Safetensors f;
    f.header = ojson::parse(bytes.substr(8, n));
    f.data = bytes.substr(8 + n);
    return f;
  }
  void Write(const std::string& path) const {
    const std::string text = header.dump();
    WriteFile(path, LengthPrefix(text.size()) + text + data);
  }
};

class CheckpointErrorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "needle_broken_ckpt_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    auto w = engine::MakePresetWeights("tiny-llama", /*seed=*/1);
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = *std::move(w);
    good_ = root_ + "/good";
    ASSERT_TRUE(engine::WriteCheckpoint(good_, weights_, engine::DType::kBF16, 0).ok());
    sharded_ = root_ + "/sharded";
    ASSERT_TRUE(engine::WriteCheckpoint(sharded_, weights_, engine::DType::kBF16, 20'000).ok());
    ASSERT_TRUE(fs::exists(sharded_ + "/" + engine::kSafetensorsIndexFile));
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

  // A fresh copy of the good (or sharded) checkpoint, named `name`.
  std::string Copy(const std::string& name, bool sharded = false) {
    const std::string dir = root_ + "/" + name;
    fs::copy(sharded ? sharded_ : good_, dir, fs::copy_options::recursive);
    return dir;
  }

  // Runs needle-server on `dir`; returns its exit status and output (stdout and stderr).
  int RunServer(const std::string& dir, std::string* output, const std::vector<std::string>& extra = {}) {
    std::string error;
    std::vector<std::string> argv = {NEEDLE_SERVER_PATH, "--model=" + dir, "--listen=127.0.0.1:0", "--log_level=info"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto p = e2e::Subprocess::Spawn(argv, &error, /*merge_stderr=*/true);
    if (p == nullptr) {
      *output = error;
      return -1;
    }
    *output = p->ReadAll(std::chrono::seconds(120));
    const int code = p->Wait(std::chrono::seconds(10));
    return code;
  }

  // The server must refuse `dir` cleanly, saying each of `expected`.
  void ExpectCleanFailure(const std::string& dir, const std::vector<std::string>& expected,
                          const std::vector<std::string>& extra_flags = {}) {
    std::string out;
    const int code = RunServer(dir, &out, extra_flags);
    EXPECT_EQ(code, 1) << "needle-server --model " << dir << " exited with " << code << ":\n" << out;
    EXPECT_THAT(out, HasSubstr("cannot start the engine")) << out;
    for (const std::string& e : expected) EXPECT_THAT(out, HasSubstr(e)) << "for " << dir;
    for (const char* crash : {"AddressSanitizer", "runtime error:", "terminate called", "Segmentation", "Aborted"}) {
      EXPECT_THAT(out, Not(HasSubstr(crash))) << out;
    }
  }

  // Edits the parsed config.json of `dir`.
  void EditConfig(const std::string& dir, const std::function<void(ojson&)>& edit) {
    ojson c = ojson::parse(ReadFile(dir + "/config.json"));
    edit(c);
    WriteFile(dir + "/config.json", c.dump(2));
  }

  std::string root_, good_, sharded_;
  engine::ModelWeights weights_;
};

TEST_F(CheckpointErrorsTest, TheGoodCheckpointServes) {
  // The control: the unbroken directory loads and serves, so every failure below is the breakage.
  std::string error;
  auto server = e2e::ServerProcess::Start({"--model=" + good_}, &error);
  ASSERT_NE(server, nullptr) << error;
  server->process().Signal(SIGTERM);
  EXPECT_EQ(server->process().Wait(std::chrono::seconds(30)), 0);
}

TEST_F(CheckpointErrorsTest, MissingTensor) {
  const std::string dir = Copy("missing_tensor");
  const std::string file = dir + "/model.safetensors";
  Safetensors f = Safetensors::Read(file);
  f.header.erase("model.layers.1.mlp.up_proj.weight");
  f.Write(file);
  ExpectCleanFailure(dir, {"\"model.layers.1.mlp.up_proj.weight\"", dir, "missing"});
}

TEST_F(CheckpointErrorsTest, WrongShape) {
  const std::string dir = Copy("wrong_shape");
  const std::string file = dir + "/model.safetensors";
  Safetensors f = Safetensors::Read(file);
  f.header[kNorm]["shape"] = {32, 2};  // same element count: only the shape is wrong
  f.Write(file);
  ExpectCleanFailure(dir, {file, std::string("\"") + kNorm + "\"", "shape [32, 2], expected [64]"});
}

TEST_F(CheckpointErrorsTest, WrongDType) {
  const std::string dir = Copy("wrong_dtype");
  const std::string file = dir + "/model.safetensors";
  Safetensors f = Safetensors::Read(file);
  f.header[kNorm]["dtype"] = "I16";  // the same element size as BF16: only the type is wrong
  f.Write(file);
  ExpectCleanFailure(dir, {file, std::string("\"") + kNorm + "\"", "dtype I16, expected BF16, F16 or F32"});
}

TEST_F(CheckpointErrorsTest, DTypeInconsistentWithTheDataOffsets) {
  const std::string dir = Copy("dtype_size");
  const std::string file = dir + "/model.safetensors";
  Safetensors f = Safetensors::Read(file);
  f.header[kNorm]["dtype"] = "F32";  // 64 F32 values need 256 bytes; the offsets span 128
  f.Write(file);
  ExpectCleanFailure(dir, {file, std::string("\"") + kNorm + "\"", "needs 256 bytes"});
}

TEST_F(CheckpointErrorsTest, UnknownDType) {
  const std::string dir = Copy("unknown_dtype");
  const std::string file = dir + "/model.safetensors";
  Safetensors f = Safetensors::Read(file);
  f.header[kNorm]["dtype"] = "Q4_K";
  f.Write(file);
  ExpectCleanFailure(dir, {file, std::string("\"") + kNorm + "\"", "unknown dtype \"Q4_K\""});
}

TEST_F(CheckpointErrorsTest, OverlappingTensors) {
  const std::string dir = Copy("overlap");
  const std::string file = dir + "/model.safetensors";
  Safetensors f = Safetensors::Read(file);
  const auto begin = f.header[kNorm]["data_offsets"][0].get<uint64_t>();
  f.header[kNorm]["data_offsets"] = {begin - 64, begin + 64};
  f.Write(file);
  ExpectCleanFailure(dir, {file, "overlap"});
}

TEST_F(CheckpointErrorsTest, TruncatedDataSection) {
  const std::string dir = Copy("truncated_data");
  const std::string file = dir + "/model.safetensors";
  const std::string bytes = ReadFile(file);
  WriteFile(file, bytes.substr(0, bytes.size() / 2));
  // The first tensor that no longer fits is named.
  ExpectCleanFailure(dir, {file, "tensor \"", "exceed the data section", "truncated file?"});
}

TEST_F(CheckpointErrorsTest, TruncatedHeader) {
  const std::string dir = Copy("truncated_header");
  const std::string file = dir + "/model.safetensors";
  const std::string bytes = ReadFile(file);
  uint64_t n = 0;
  for (int b = 7; b >= 0; --b) n = (n << 8) | static_cast<uint8_t>(bytes[b]);
  WriteFile(file, bytes.substr(0, 8 + n / 2));
  ExpectCleanFailure(dir, {file, "exceeds the file size", "truncated file?"});
}

TEST_F(CheckpointErrorsTest, FileShorterThanTheLengthField) {
  const std::string dir = Copy("too_short");
  WriteFile(dir + "/model.safetensors", "abc");
  ExpectCleanFailure(dir, {dir + "/model.safetensors", "too short"});
}

TEST_F(CheckpointErrorsTest, CorruptHeaderJson) {
  const std::string dir = Copy("corrupt_json");
  const std::string file = dir + "/model.safetensors";
  std::string bytes = ReadFile(file);
  bytes[8 + 20] = '\x01';  // a control byte inside the JSON text
  WriteFile(file, bytes);
  ExpectCleanFailure(dir, {file, "invalid JSON header"});
}

TEST_F(CheckpointErrorsTest, HeaderLengthFieldIsGarbage) {
  const std::string dir = Copy("garbage_length");
  const std::string file = dir + "/model.safetensors";
  std::string bytes = ReadFile(file);
  bytes.replace(0, 8, LengthPrefix(0xfedcba9876543210ull));
  WriteFile(file, bytes);
  ExpectCleanFailure(dir, {file, "exceeds the limit"});
}

TEST_F(CheckpointErrorsTest, HeaderIsNotAnObject) {
  const std::string dir = Copy("header_array");
  const std::string file = dir + "/model.safetensors";
  WriteFile(file, LengthPrefix(8) + "[1, 2]  ");
  ExpectCleanFailure(dir, {file, "not an object"});
}

TEST_F(CheckpointErrorsTest, NoWeightsFile) {
  const std::string dir = Copy("no_weights");
  fs::remove(dir + "/model.safetensors");
  ExpectCleanFailure(dir, {dir, "no model.safetensors or model.safetensors.index.json"});
}

TEST_F(CheckpointErrorsTest, ShardNamedByTheIndexIsMissing) {
  const std::string dir = Copy("missing_shard", /*sharded=*/true);
  const ojson index = ojson::parse(ReadFile(dir + "/" + engine::kSafetensorsIndexFile));
  const std::string shard = index["weight_map"][kNorm].get<std::string>();
  fs::remove(dir + "/" + shard);
  ExpectCleanFailure(dir, {dir + "/" + shard, "cannot open"});
}

TEST_F(CheckpointErrorsTest, TensorMissingFromItsShard) {
  const std::string dir = Copy("tensor_not_in_shard", /*sharded=*/true);
  const ojson index = ojson::parse(ReadFile(dir + "/" + engine::kSafetensorsIndexFile));
  const std::string shard = dir + "/" + index["weight_map"][kNorm].get<std::string>();
  Safetensors f = Safetensors::Read(shard);
  f.header.erase(kNorm);
  f.Write(shard);
  ExpectCleanFailure(dir, {engine::kSafetensorsIndexFile, std::string("\"") + kNorm + "\"", "does not contain it"});
}

TEST_F(CheckpointErrorsTest, ConfigMissingARequiredField) {
  const std::string dir = Copy("config_missing_field");
  EditConfig(dir, [](ojson& c) { c.erase("vocab_size"); });
  ExpectCleanFailure(dir, {dir + "/config.json", "\"vocab_size\" is missing"});
}

TEST_F(CheckpointErrorsTest, ConfigNotJson) {
  const std::string dir = Copy("config_not_json");
  WriteFile(dir + "/config.json", "{\"model_type\": \"llama\", ");
  ExpectCleanFailure(dir, {dir + "/config.json", "not valid JSON"});
}

TEST_F(CheckpointErrorsTest, ConfigUnknownModelType) {
  const std::string dir = Copy("config_model_type");
  EditConfig(dir, [](ojson& c) { c["model_type"] = "gpt2"; });
  ExpectCleanFailure(dir, {dir + "/config.json", "unsupported model_type \"gpt2\""});
}

TEST_F(CheckpointErrorsTest, ConfigFieldOfTheWrongType) {
  const std::string dir = Copy("config_field_type");
  EditConfig(dir, [](ojson& c) { c["hidden_size"] = "sixty-four"; });
  ExpectCleanFailure(dir, {dir + "/config.json", "\"hidden_size\" must be an integer"});
}

TEST_F(CheckpointErrorsTest, ConfigContradictsItself) {
  const std::string heads = Copy("config_heads");
  EditConfig(heads, [](ojson& c) { c["num_key_value_heads"] = 3; });  // 4 query heads
  ExpectCleanFailure(heads, {heads + "/config.json", "must be a multiple of num_kv_heads"});

  const std::string eos = Copy("config_eos");
  EditConfig(eos, [](ojson& c) { c["eos_token_id"] = 999; });  // vocabulary of 259
  ExpectCleanFailure(eos, {eos + "/config.json", "eos_token_id 999 must be in [0, vocab_size)"});

  const std::string zero = Copy("config_zero_heads");
  EditConfig(zero, [](ojson& c) { c["num_attention_heads"] = 0; });
  ExpectCleanFailure(zero, {zero + "/config.json", "num_attention_heads"});
}

TEST_F(CheckpointErrorsTest, ConfigContradictsTheWeights) {
  // Widths: every tensor has the wrong shape; the first one checked is named.
  const std::string wide = Copy("config_hidden");
  EditConfig(wide, [](ojson& c) { c["hidden_size"] = 128; });
  ExpectCleanFailure(wide, {wide + "/model.safetensors", std::string("\"") + kEmbed + "\"", "expected [259, 128]"});

  // One layer more than the weights hold.
  const std::string deeper = Copy("config_layers");
  EditConfig(deeper, [](ojson& c) { c["num_hidden_layers"] = 3; });
  ExpectCleanFailure(deeper, {deeper, "\"model.layers.2.", "missing"});

  // Absurdly many layers must fail as fast, without trying to allocate them.
  const std::string absurd = Copy("config_layers_absurd");
  EditConfig(absurd, [](ojson& c) { c["num_hidden_layers"] = 2000000000; });
  ExpectCleanFailure(absurd, {absurd, "\"model.layers.", "num_hidden_layers"});
}

// Whether this binary (and so the needle-server built with it) runs under AddressSanitizer.
constexpr bool kAsan =
#if defined(__SANITIZE_ADDRESS__)
    true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
    true;
#else
    false;
#endif
#else
    false;
#endif

TEST_F(CheckpointErrorsTest, ConfigWithAContextTooLargeForTheKvBudget) {
  // The pools must hold one whole context: 2^31 - 1 positions do not fit the default 256 MiB, and the
  // server says so (and how many bytes it would take) instead of allocating past its budget.
  const std::string dir = Copy("config_context");
  EditConfig(dir, [](ojson& c) { c["max_position_embeddings"] = 2147483647; });
  ExpectCleanFailure(dir, {"cannot hold one sequence of 2147483647 tokens", "--max_seq_tokens"});
}

TEST_F(CheckpointErrorsTest, ConfigWithAContextTooLargeToAllocate) {
  // With a budget large enough on paper the allocation itself fails: a start-up error, not a crash.
  if (kAsan) {
    GTEST_SKIP() << "ASan's operator new reports an impossible allocation as a fatal error instead of "
                    "throwing std::bad_alloc; the normal build runs this case";
  }
  const std::string dir = Copy("config_alloc");
  EditConfig(dir, [](ojson& c) { c["max_position_embeddings"] = 2147483647; });
  ExpectCleanFailure(dir, {dir, "out of memory"}, {"--kv_cache_bytes=4611686018427387904"});
}

TEST_F(CheckpointErrorsTest, ConfigWithDeeplyNestedValue) {
  // A field holding 100000 nested arrays: refused without recursing through it.
  const std::string dir = Copy("config_nested");
  std::string text = "{\"model_type\": \"llama\", \"vocab_size\": ";
  text += std::string(100'000, '[') + std::string(100'000, ']') + "}";
  WriteFile(dir + "/config.json", text);
  ExpectCleanFailure(dir, {dir + "/config.json"});
}

}  // namespace
}  // namespace needle::reliability
