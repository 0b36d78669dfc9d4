// needle.v1 <-> engine conversions (server/proto_convert.h) and the slow-reader queue that merges
// converted token chunks (server/response_queue.h).
#include "server/proto_convert.h"

#include <chrono>
#include <cmath>
#include <limits>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/response_queue.h"

namespace needle::server {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr int kVocab = 259;  // the tiny presets: bytes 0..255, bos 256, eos 257, pad 258

class ProtoConvertTest : public ::testing::Test {
 protected:
  absl::StatusOr<engine::Request> Convert(const v1::GenerateRequest& p) {
    return RequestFromProto(p, tokenizer_, kVocab);
  }
  engine::ByteTokenizer tokenizer_{kVocab};
};

TEST_F(ProtoConvertTest, UnsetSamplingFieldsKeepTheEngineDefaults) {
  v1::GenerateRequest p;
  p.mutable_token_ids()->add_ids(5);
  absl::StatusOr<engine::Request> r = Convert(p);
  ASSERT_TRUE(r.ok()) << r.status();
  const engine::SamplingParams defaults;
  EXPECT_EQ(r->sampling.temperature, defaults.temperature);
  EXPECT_EQ(r->sampling.temperature, 1.0f);
  EXPECT_EQ(r->sampling.top_p, defaults.top_p);
  EXPECT_EQ(r->sampling.top_k, defaults.top_k);
  EXPECT_EQ(r->sampling.min_p, defaults.min_p);
  EXPECT_EQ(r->sampling.repetition_penalty, defaults.repetition_penalty);
  EXPECT_EQ(r->sampling.presence_penalty, defaults.presence_penalty);
  EXPECT_EQ(r->sampling.frequency_penalty, defaults.frequency_penalty);
  EXPECT_FALSE(r->sampling.seed.has_value());
  EXPECT_FALSE(r->stopping.max_tokens.has_value());
  EXPECT_FALSE(r->stopping.ignore_eos);
  EXPECT_FALSE(r->return_logprobs);
  EXPECT_EQ(r->top_logprobs, 0);
  EXPECT_EQ(r->deadline, absl::InfiniteFuture());
  EXPECT_TRUE(r->id.empty());
}

TEST_F(ProtoConvertTest, SetFieldsAreCopied) {
  v1::GenerateRequest p;
  p.set_request_id("abc");
  p.mutable_token_ids()->add_ids(1);
  p.mutable_token_ids()->add_ids(258);
  auto* s = p.mutable_sampling();
  s->set_temperature(0);  // set to zero is not the same as unset
  s->set_top_p(0.5f);
  s->set_top_k(7);
  s->set_min_p(0.05f);
  s->set_repetition_penalty(1.2f);
  s->set_presence_penalty(-0.5f);
  s->set_frequency_penalty(0.25f);
  s->set_seed(42);
  auto* st = p.mutable_stopping();
  st->set_max_tokens(9);
  st->add_stop("\n\n");
  st->add_stop_token_ids(257);
  st->set_ignore_eos(true);
  p.set_return_logprobs(true);
  p.set_top_logprobs(3);
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  absl::StatusOr<engine::Request> r = RequestFromProto(p, tokenizer_, kVocab, deadline);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->id, "abc");
  EXPECT_THAT(r->prompt, ElementsAre(1, 258));
  EXPECT_EQ(r->sampling.temperature, 0.0f);
  EXPECT_EQ(r->sampling.top_p, 0.5f);
  EXPECT_EQ(r->sampling.top_k, 7);
  EXPECT_EQ(r->sampling.min_p, 0.05f);
  EXPECT_EQ(r->sampling.repetition_penalty, 1.2f);
  EXPECT_EQ(r->sampling.presence_penalty, -0.5f);
  EXPECT_EQ(r->sampling.frequency_penalty, 0.25f);
  EXPECT_EQ(r->sampling.seed, 42u);
  EXPECT_EQ(r->stopping.max_tokens, 9);
  EXPECT_THAT(r->stopping.stop, ElementsAre("\n\n"));
  EXPECT_THAT(r->stopping.stop_token_ids, ElementsAre(257));
  EXPECT_TRUE(r->stopping.ignore_eos);
  EXPECT_TRUE(r->return_logprobs);
  EXPECT_EQ(r->top_logprobs, 3);
  EXPECT_EQ(r->deadline, deadline);
}

TEST_F(ProtoConvertTest, ValuesTheEngineRejectsAreCarriedForItToReject) {
  // Range checks are the engine's (engine/request.cc); conversion must not silently repair them.
  v1::GenerateRequest p;
  p.mutable_token_ids()->add_ids(5);
  p.mutable_sampling()->set_temperature(std::numeric_limits<float>::quiet_NaN());
  p.mutable_sampling()->set_top_p(0);
  p.mutable_stopping()->set_max_tokens(0);
  p.set_top_logprobs(std::numeric_limits<uint32_t>::max());
  absl::StatusOr<engine::Request> r = Convert(p);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(std::isnan(r->sampling.temperature));
  EXPECT_EQ(r->sampling.top_p, 0.0f);
  EXPECT_EQ(r->stopping.max_tokens, 0);
  EXPECT_GT(r->top_logprobs, 20);  // clamped to int, still out of the engine's range
  EXPECT_FALSE(r->sampling.Validate().ok());
  EXPECT_FALSE(r->stopping.Validate().ok());
}

TEST_F(ProtoConvertTest, HugeTopKMeansNoLimitWithoutOverflow) {
  v1::GenerateRequest p;
  p.mutable_token_ids()->add_ids(5);
  p.mutable_sampling()->set_top_k(std::numeric_limits<uint32_t>::max());
  absl::StatusOr<engine::Request> r = Convert(p);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->sampling.top_k, std::numeric_limits<int32_t>::max());
}

TEST_F(ProtoConvertTest, TextIsTokenized) {
  v1::GenerateRequest p;
  p.set_text("hi \xC3\xA9");  // "hi é"
  absl::StatusOr<engine::Request> r = Convert(p);
  ASSERT_TRUE(r.ok()) << r.status();
  absl::StatusOr<std::vector<int32_t>> direct = tokenizer_.Encode("hi \xC3\xA9");
  ASSERT_TRUE(direct.ok());
  EXPECT_EQ(r->prompt, *direct);
}

TEST_F(ProtoConvertTest, MissingOrEmptyInputNamesTheField) {
  v1::GenerateRequest none;
  EXPECT_EQ(Convert(none).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(Convert(none).status().message()), HasSubstr("input"));

  v1::GenerateRequest empty_text;
  empty_text.set_text("");
  EXPECT_EQ(Convert(empty_text).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(Convert(empty_text).status().message()), HasSubstr("input.text"));

  v1::GenerateRequest empty_ids;
  empty_ids.mutable_token_ids();
  EXPECT_EQ(Convert(empty_ids).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(Convert(empty_ids).status().message()), HasSubstr("input.token_ids"));
}

TEST_F(ProtoConvertTest, TokenIdsOutsideTheVocabularyAreRefused) {
  for (uint32_t bad : {static_cast<uint32_t>(kVocab), 1u << 31, std::numeric_limits<uint32_t>::max()}) {
    v1::GenerateRequest p;
    p.mutable_token_ids()->add_ids(3);
    p.mutable_token_ids()->add_ids(bad);
    absl::Status s = Convert(p).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(s.message()), HasSubstr("input.token_ids.ids[1]")) << bad;
  }
  v1::GenerateRequest p;
  p.mutable_token_ids()->add_ids(3);
  p.mutable_stopping()->add_stop_token_ids(1u << 31);
  absl::Status s = Convert(p).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("stopping.stop_token_ids[0]"));
}

TEST_F(ProtoConvertTest, InvalidUtf8TextIsRefusedInProcess) {
  // Over the wire the proto3 parser refuses this first (the e2e test checks that path).
  v1::GenerateRequest p;
  p.set_text(std::string("ab\xC3(", 4));
  absl::Status s = Convert(p).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("input.text"));
}

TEST(ProtoParse, Proto3RejectsInvalidUtf8InStringFields) {
  // Documents why an invalid-UTF-8 prompt never reaches the server's own check over gRPC: the bytes
  // of a GenerateRequest{text: "\xff"} (field 2, length 1) fail to parse.
  const std::string wire("\x12\x01\xff", 3);
  v1::GenerateRequest p;
  EXPECT_FALSE(p.ParseFromString(wire));
}

TEST_F(ProtoConvertTest, OverlongRequestIdIsRefused) {
  v1::GenerateRequest p;
  p.mutable_token_ids()->add_ids(3);
  p.set_request_id(std::string(kMaxRequestIdBytes + 1, 'x'));
  absl::Status s = Convert(p).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("request_id"));
}

TEST(DeadlineFromChrono, NoDeadlineIsInfinite) {
  EXPECT_EQ(DeadlineFromChrono(std::chrono::system_clock::time_point::max()), absl::InfiniteFuture());
  const auto tp = std::chrono::system_clock::now() + std::chrono::seconds(3);
  EXPECT_EQ(DeadlineFromChrono(tp), absl::FromChrono(tp));
}

TEST(FinishReasonToProto, EveryReason) {
  EXPECT_EQ(FinishReasonToProto(engine::FinishReason::kUnspecified), v1::FINISH_REASON_UNSPECIFIED);
  EXPECT_EQ(FinishReasonToProto(engine::FinishReason::kStop), v1::FINISH_REASON_STOP);
  EXPECT_EQ(FinishReasonToProto(engine::FinishReason::kLength), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(FinishReasonToProto(engine::FinishReason::kEos), v1::FINISH_REASON_EOS);
  EXPECT_EQ(FinishReasonToProto(engine::FinishReason::kCancelled), v1::FINISH_REASON_CANCELLED);
  EXPECT_EQ(FinishReasonToProto(engine::FinishReason::kDeadline), v1::FINISH_REASON_DEADLINE);
  EXPECT_EQ(FinishReasonToProto(engine::FinishReason::kError), v1::FINISH_REASON_ERROR);
}

engine::RequestEvent TokensEvent(std::vector<int32_t> ids, std::string text, double t0) {
  engine::RequestEvent e;
  e.kind = engine::RequestEvent::Kind::kTokens;
  e.request_id = "r1";
  e.token_ids = ids;
  e.text = std::move(text);
  for (size_t i = 0; i < ids.size(); ++i) e.token_times_s.push_back(t0 + 0.01 * i);
  return e;
}

TEST(EventToProto, Tokens) {
  engine::RequestEvent e = TokensEvent({104, 105}, "hi", 0.5);
  engine::TokenLogprob lp;
  lp.id = 104;
  lp.logprob = -0.25f;
  lp.top = {{104, -0.25f}, {7, -2.0f}};
  e.logprobs = {lp, lp};
  v1::GenerateResponse out;
  EventToProto(e, &out);
  EXPECT_EQ(out.request_id(), "r1");
  ASSERT_TRUE(out.has_tokens());
  EXPECT_THAT(out.tokens().token_ids(), ElementsAre(104u, 105u));
  EXPECT_EQ(out.tokens().text(), "hi");
  EXPECT_THAT(out.tokens().token_times_s(), ElementsAre(0.5, 0.51));
  ASSERT_EQ(out.tokens().logprobs_size(), 2);
  EXPECT_EQ(out.tokens().logprobs(0).token_id(), 104u);
  EXPECT_EQ(out.tokens().logprobs(0).logprob(), -0.25f);
  ASSERT_EQ(out.tokens().logprobs(0).top_size(), 2);
  EXPECT_EQ(out.tokens().logprobs(0).top(1).token_id(), 7u);
  EXPECT_EQ(out.tokens().logprobs(0).top(1).logprob(), -2.0f);
}

TEST(EventToProto, ProgressAndFinished) {
  engine::RequestEvent p;
  p.kind = engine::RequestEvent::Kind::kPrefillProgress;
  p.request_id = "r2";
  p.prefilled_tokens = 64;
  p.prompt_tokens = 3000;
  v1::GenerateResponse out;
  EventToProto(p, &out);
  ASSERT_TRUE(out.has_progress());
  EXPECT_EQ(out.progress().prefilled_tokens(), 64u);
  EXPECT_EQ(out.progress().prompt_tokens(), 3000u);

  engine::RequestEvent f;
  f.kind = engine::RequestEvent::Kind::kFinished;
  f.request_id = "r2";
  f.reason = engine::FinishReason::kStop;
  f.matched_stop = "END";
  f.usage = {100, 7};
  f.timings = {0.1, 0.2, 0.3, 0.4};
  v1::GenerateResponse fin;
  EventToProto(f, &fin);
  ASSERT_TRUE(fin.has_finished());
  EXPECT_EQ(fin.finished().reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(fin.finished().matched_stop(), "END");
  EXPECT_EQ(fin.finished().usage().prompt_tokens(), 100u);
  EXPECT_EQ(fin.finished().usage().completion_tokens(), 7u);
  EXPECT_EQ(fin.finished().timings().queue_s(), 0.1);
  EXPECT_EQ(fin.finished().timings().prefill_s(), 0.2);
  EXPECT_EQ(fin.finished().timings().first_token_s(), 0.3);
  EXPECT_EQ(fin.finished().timings().decode_s(), 0.4);
  EXPECT_TRUE(fin.finished().message().empty());

  f.reason = engine::FinishReason::kDeadline;
  f.status = absl::DeadlineExceededError("the request's deadline passed");
  v1::GenerateResponse late;
  EventToProto(f, &late);
  EXPECT_EQ(late.finished().reason(), v1::FINISH_REASON_DEADLINE);
  EXPECT_EQ(late.finished().message(), "the request's deadline passed");
}

TEST(ModelInfoToProto, NsaAndDense) {
  engine::ModelConfig c;
  c.arch = engine::Architecture::kNsaPaper;
  c.vocab_size = 259;
  c.max_position_embeddings = 16384;
  c.bos_token_id = 256;
  c.eos_token_id = 257;
  c.num_layers = 2;
  c.hidden_size = 128;
  c.num_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim_qk = 32;
  c.head_dim_v = 32;
  c.nsa.window = 512;
  v1::ModelInfo info = ModelInfoToProto(c, "demo", "byte", "cpu", 64);
  EXPECT_EQ(info.model(), "demo");
  EXPECT_EQ(info.architecture(), "nsa-paper");
  EXPECT_EQ(info.vocab_size(), 259u);
  EXPECT_EQ(info.max_context(), 16384u);
  ASSERT_TRUE(info.has_bos_token_id());
  EXPECT_EQ(info.bos_token_id(), 256u);
  EXPECT_EQ(info.eos_token_id(), 257u);
  EXPECT_EQ(info.tokenizer(), "byte");
  EXPECT_EQ(info.page_tokens(), 64u);
  ASSERT_TRUE(info.has_nsa());
  EXPECT_EQ(info.nsa().window(), 512u);
  EXPECT_EQ(info.nsa().compression(), "mlp-pre-rope");

  c.arch = engine::Architecture::kLlama;
  c.bos_token_id = -1;
  v1::ModelInfo dense = ModelInfoToProto(c, "tiny-llama", "byte", "cpu", 64);
  EXPECT_EQ(dense.architecture(), "llama");
  EXPECT_FALSE(dense.has_nsa());
  EXPECT_FALSE(dense.has_bos_token_id());
}

TEST(StatsToProto, OnlyPresentPools) {
  engine::EngineStats s;
  s.running = 2;
  s.waiting = 1;
  s.pools = {{"selection", true, 100, 90}, {"compressed", true, 10, 9}, {"window", false, 0, 0}};
  s.finished = 5;
  s.cancelled = 2;
  s.refused = 1;
  s.failed = 0;
  s.steps = 77;
  s.draining = true;
  v1::ServerStats out = StatsToProto(s);
  EXPECT_EQ(out.running(), 2u);
  EXPECT_EQ(out.waiting(), 1u);
  ASSERT_EQ(out.pools_size(), 2);
  EXPECT_EQ(out.pools(0).name(), "selection");
  EXPECT_EQ(out.pools(0).total_pages(), 100u);
  EXPECT_EQ(out.pools(0).free_pages(), 90u);
  EXPECT_EQ(out.pools(1).name(), "compressed");
  EXPECT_EQ(out.finished(), 5u);
  EXPECT_EQ(out.cancelled(), 2u);
  EXPECT_EQ(out.refused(), 1u);
  EXPECT_EQ(out.steps(), 77u);
  EXPECT_TRUE(out.healthy());
  EXPECT_TRUE(out.draining());
}

// ---- ResponseQueue: coalescing and the slow-reader bound ----

v1::GenerateResponse TokensMessage(std::vector<int32_t> ids, std::string text, double t0) {
  v1::GenerateResponse m;
  EventToProto(TokensEvent(std::move(ids), std::move(text), t0), &m);
  return m;
}

v1::GenerateResponse ProgressMessage(int64_t done) {
  engine::RequestEvent e;
  e.kind = engine::RequestEvent::Kind::kPrefillProgress;
  e.request_id = "r1";
  e.prefilled_tokens = done;
  e.prompt_tokens = 1000;
  v1::GenerateResponse m;
  EventToProto(e, &m);
  return m;
}

TEST(ResponseQueue, AWaitingChunkAbsorbsLaterTokens) {
  ResponseQueue q(100);
  ASSERT_TRUE(q.Push(TokensMessage({1}, "a", 1.0)));
  ASSERT_TRUE(q.Push(TokensMessage({2, 3}, "bc", 2.0)));
  ASSERT_TRUE(q.Push(TokensMessage({4}, "", 3.0)));
  EXPECT_EQ(q.size(), 1u);
  EXPECT_EQ(q.buffered_tokens(), 4);
  EXPECT_EQ(q.coalesced_events(), 2);
  v1::GenerateResponse m;
  q.Pop(&m);
  EXPECT_EQ(m.request_id(), "r1");
  EXPECT_THAT(m.tokens().token_ids(), ElementsAre(1u, 2u, 3u, 4u));
  EXPECT_EQ(m.tokens().text(), "abc");
  EXPECT_THAT(m.tokens().token_times_s(), ElementsAre(1.0, 2.0, 2.01, 3.0));
  EXPECT_TRUE(q.empty());
  EXPECT_EQ(q.buffered_tokens(), 0);
}

TEST(ResponseQueue, OrderIsKeptAcrossKinds) {
  ResponseQueue q(100);
  ASSERT_TRUE(q.Push(ProgressMessage(64)));
  ASSERT_TRUE(q.Push(ProgressMessage(128)));  // replaces the waiting progress
  ASSERT_TRUE(q.Push(TokensMessage({1}, "a", 1.0)));
  v1::GenerateResponse fin;
  fin.set_request_id("r1");
  fin.mutable_finished()->set_reason(v1::FINISH_REASON_LENGTH);
  ASSERT_TRUE(q.Push(std::move(fin)));
  ASSERT_TRUE(q.Push(TokensMessage({2}, "b", 2.0)));  // after Finished: never merged backwards
  ASSERT_EQ(q.size(), 4u);
  v1::GenerateResponse m;
  q.Pop(&m);
  ASSERT_TRUE(m.has_progress());
  EXPECT_EQ(m.progress().prefilled_tokens(), 128u);
  q.Pop(&m);
  EXPECT_THAT(m.tokens().token_ids(), ElementsAre(1u));
  q.Pop(&m);
  EXPECT_TRUE(m.has_finished());
  q.Pop(&m);
  EXPECT_THAT(m.tokens().token_ids(), ElementsAre(2u));
}

TEST(ResponseQueue, LogprobsAreMergedInOrder) {
  ResponseQueue q(100);
  engine::RequestEvent a = TokensEvent({1}, "", 0);
  a.logprobs = {{1, -1.0f, {}}};
  engine::RequestEvent b = TokensEvent({2}, "", 0);
  b.logprobs = {{2, -2.0f, {{2, -2.0f}}}};
  v1::GenerateResponse ma, mb;
  EventToProto(a, &ma);
  EventToProto(b, &mb);
  ASSERT_TRUE(q.Push(std::move(ma)));
  ASSERT_TRUE(q.Push(std::move(mb)));
  v1::GenerateResponse m;
  q.Pop(&m);
  ASSERT_EQ(m.tokens().logprobs_size(), 2);
  EXPECT_EQ(m.tokens().logprobs(0).token_id(), 1u);
  EXPECT_EQ(m.tokens().logprobs(1).token_id(), 2u);
  EXPECT_EQ(m.tokens().logprobs(1).top_size(), 1);
}

TEST(ResponseQueue, RefusesTokensBeyondTheBound) {
  ResponseQueue q(3);
  ASSERT_TRUE(q.Push(TokensMessage({1, 2}, "", 0)));
  ASSERT_TRUE(q.Push(TokensMessage({3}, "", 0)));
  EXPECT_FALSE(q.Push(TokensMessage({4}, "d", 0)));  // would be 4 > 3: nothing added
  EXPECT_EQ(q.buffered_tokens(), 3);
  v1::GenerateResponse m;
  q.Pop(&m);
  EXPECT_THAT(m.tokens().token_ids(), ElementsAre(1u, 2u, 3u));
  EXPECT_EQ(q.buffered_tokens(), 0);
  EXPECT_TRUE(q.Push(TokensMessage({4}, "d", 0)));  // room again once the reader caught up
  v1::GenerateResponse fin;
  fin.mutable_finished();
  ASSERT_TRUE(q.Push(ProgressMessage(1)));
  EXPECT_TRUE(q.Push(std::move(fin)));  // no tokens: always accepted
  q.Clear();
  EXPECT_TRUE(q.empty());
  EXPECT_EQ(q.buffered_tokens(), 0);
}

}  // namespace
}  // namespace needle::server
