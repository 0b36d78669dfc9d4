#include "engine/model_config.h"

#include <gtest/gtest.h>

namespace needle::engine {
namespace {

using json = nlohmann::json;

TEST(NsaParams, NumCompressedAtTheEdges) {
  NsaParams p;  // l = 32, d = 16
  EXPECT_EQ(p.NumCompressed(0), 0);
  EXPECT_EQ(p.NumCompressed(30), 0);   // t = l - 2
  EXPECT_EQ(p.NumCompressed(31), 1);   // t = l - 1: first block [0, 32) complete
  EXPECT_EQ(p.NumCompressed(46), 1);   // t = l - 1 + d - 1
  EXPECT_EQ(p.NumCompressed(47), 2);   // t = l - 1 + d: second block [16, 48) complete
  EXPECT_TRUE(p.CompletesCompressed(31));
  EXPECT_FALSE(p.CompletesCompressed(32));
  EXPECT_TRUE(p.CompletesCompressed(47));
  EXPECT_EQ(p.NumSelectionBlocks(63), 1);
  EXPECT_EQ(p.NumSelectionBlocks(64), 2);
}

TEST(ModelConfig, FlaNsaDefaultsMatchTrainingCode) {
  json j = {{"model_type", "nsa"}, {"hidden_size", 1024}, {"block_counts", 12}};
  auto c = ModelConfigFromJson(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arch, Architecture::kNsa);
  EXPECT_EQ(c->head_dim_qk, 64);
  EXPECT_EQ(c->nsa.num_selected, 16);  // next power of two of 12
  EXPECT_EQ(c->nsa.cmp_block, 64);
  EXPECT_EQ(c->nsa.window, 512);
  EXPECT_TRUE(c->nsa.shared_kv);
  // 256 * ceil(int(1024 * 4 * 2 / 3) / 256) = 256 * ceil(2730 / 256) = 2816
  EXPECT_EQ(c->intermediate_size, 2816);
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_EQ(c->eos_token_id, 2);
}

TEST(ModelConfig, RoundTripsEveryArchitecture) {
  for (const char* mt : {"nsa", "llama-nsa", "nsa-paper", "llama"}) {
    json j = {{"model_type", mt}, {"vocab_size", 300}, {"hidden_size", 64}, {"num_hidden_layers", 2},
              {"num_attention_heads", 8}, {"num_key_value_heads", 2}, {"intermediate_size", 96},
              {"compress_mlp_hidden", 32}, {"num_heads", 16}, {"num_kv_heads", 1}};
    auto c = ModelConfigFromJson(j);
    ASSERT_TRUE(c.ok()) << mt << ": " << c.status();
    auto back = ModelConfigFromJson(ModelConfigToJson(*c));
    ASSERT_TRUE(back.ok()) << mt << ": " << back.status();
    EXPECT_TRUE(*back == *c) << mt;
  }
}

TEST(ModelConfig, ErrorsNameTheField) {
  auto c = ModelConfigFromJson(json{{"model_type", "llama"}, {"hidden_size", 64}}, "x/config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("vocab_size"), std::string::npos) << c.status();
  EXPECT_NE(c.status().message().find("x/config.json"), std::string::npos) << c.status();
  auto bad_type = ModelConfigFromJson(json{{"model_type", "gpt2"}});
  EXPECT_FALSE(bad_type.ok());
  auto bad_heads = ModelConfigFromJson(json{{"model_type", "llama"}, {"vocab_size", 10}, {"hidden_size", 64},
                                            {"num_hidden_layers", 1}, {"num_attention_heads", 6},
                                            {"num_key_value_heads", 4}, {"intermediate_size", 8}});
  ASSERT_FALSE(bad_heads.ok());
  EXPECT_NE(bad_heads.status().message().find("num_kv_heads"), std::string::npos) << bad_heads.status();
  auto wrong_type = ModelConfigFromJson(json{{"model_type", "llama"}, {"vocab_size", "ten"}});
  ASSERT_FALSE(wrong_type.ok());
  EXPECT_NE(wrong_type.status().message().find("vocab_size"), std::string::npos);
}

TEST(ModelConfig, LlamaNsaFollowsTheFlaOrgKernel) {
  json j = {{"model_type", "llama-nsa"}, {"vocab_size", 100}, {"hidden_size", 64}, {"num_hidden_layers", 1},
            {"num_attention_heads", 4}, {"num_key_value_heads", 1}, {"intermediate_size", 32},
            {"block_size", 16}, {"block_counts", 5}};
  auto c = ModelConfigFromJson(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->nsa.num_selected, 8);       // next power of two
  EXPECT_EQ(c->nsa.topk_merge_chunk, 16);  // chunks of block_size blocks
  EXPECT_EQ(c->nsa.forced_initial, 0);
  EXPECT_EQ(c->nsa.forced_local, 1);
  EXPECT_EQ(c->nsa.window, 512);
  j["block_counts"] = 17;  // 32 slots > block_size 16
  EXPECT_FALSE(ModelConfigFromJson(j).ok());
  j["block_counts"] = 16;
  j["inference_mode"] = "sparse";  // an SSA checkpoint
  auto ssa = ModelConfigFromJson(j);
  ASSERT_FALSE(ssa.ok());
  EXPECT_NE(ssa.status().message().find("inference_mode"), std::string::npos);
}

TEST(ModelConfig, EosListsRopeParametersAndNulls) {
  json j = {{"model_type", "llama"}, {"vocab_size", 100}, {"hidden_size", 64}, {"num_hidden_layers", 1},
            {"num_attention_heads", 4}, {"intermediate_size", 32}, {"eos_token_id", {7, 9}},
            {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 500000.0}}}};
  auto c = ModelConfigFromJson(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->eos_token_id, 7);
  EXPECT_TRUE(c->IsEos(7));
  EXPECT_TRUE(c->IsEos(9));
  EXPECT_FALSE(c->IsEos(8));
  EXPECT_EQ(c->rope_theta, 500000.0);
  auto back = ModelConfigFromJson(ModelConfigToJson(*c));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(*back == *c);
  j["rope_parameters"]["rope_type"] = "yarn";
  EXPECT_FALSE(ModelConfigFromJson(j).ok());
  j.erase("rope_parameters");
  j["mlp_bias"] = true;
  EXPECT_FALSE(ModelConfigFromJson(j).ok());

  json n = {{"model_type", "nsa"}, {"num_heads", 16}, {"num_kv_heads", nullptr}};
  auto fla = ModelConfigFromJson(n);
  ASSERT_TRUE(fla.ok()) << fla.status();
  EXPECT_EQ(fla->num_kv_heads, 16);  // FLA's layer: None means num_heads
  n["window_size"] = nullptr;
  EXPECT_FALSE(ModelConfigFromJson(n).ok());
  json r = {{"model_type", "nsa"}, {"hidden_ratio", 3.5}, {"hidden_size", 512}};
  auto ratio = ModelConfigFromJson(r);
  ASSERT_TRUE(ratio.ok()) << ratio.status();
  // 256 * ceil(int(512 * 3.5 * 2 / 3) / 256) = 256 * ceil(1194 / 256) = 1280
  EXPECT_EQ(ratio->intermediate_size, 1280);
}

}  // namespace
}  // namespace needle::engine
