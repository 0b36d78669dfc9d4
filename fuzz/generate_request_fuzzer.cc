// Fuzz target: request validation. Arbitrary bytes are parsed as a needle.v1.GenerateRequest; what
// parses goes through the server's conversion (server/proto_convert.h RequestFromProto, with the
// demo model's byte tokenizer and vocabulary) and then through Engine::Submit on a drained engine.
// Submit validates everything (SamplingParams/StoppingCriteria::Validate, vocabulary, context, KV
// capacity, top_logprobs) before it looks at draining, so a request that passes every check is
// answered UNAVAILABLE and never runs: the target exercises the whole validation path, nothing else.
// Invariants: conversion refuses only with INVALID_ARGUMENT; Submit only with INVALID_ARGUMENT,
// OUT_OF_RANGE, RESOURCE_EXHAUSTED or UNAVAILABLE, each with a message; the gRPC status mapping
// keeps the code. A request that passes also gets a Sampler and a StopMatcher built from its
// parameters and a few sampling steps, which must pick ids inside the vocabulary.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "engine/builder.h"
#include "engine/sampler.h"
#include "engine/stop_matcher.h"
#include "fuzz/fuzz_check.h"
#include "needle/v1/generation.pb.h"
#include "server/proto_convert.h"
#include "server/status_mapping.h"
#include "spdlog/spdlog.h"

namespace {

using needle::engine::Engine;

Engine& DrainedEngine() {
  static Engine* engine = [] {
    spdlog::set_level(spdlog::level::off);
    needle::engine::EngineOptions o;
    o.model = "demo";
    // The smallest cache BuildEngine accepts: one whole demo context (16384 tokens, 18448384 bytes).
    o.kv_cache_bytes = 18448384;
    o.engine.stats_log_interval_s = 0;
    absl::StatusOr<std::unique_ptr<Engine>> e = needle::engine::BuildEngine(o);
    NEEDLE_FUZZ_CHECK(e.ok());
    (*e)->Drain();
    return e->release();
  }();
  return *engine;
}

bool IsSubmitRefusal(absl::StatusCode code) {
  return code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kOutOfRange ||
         code == absl::StatusCode::kResourceExhausted || code == absl::StatusCode::kUnavailable;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Engine& engine = DrainedEngine();
  needle::v1::GenerateRequest proto;
  if (!proto.ParseFromArray(data, static_cast<int>(size))) return 0;
  const int vocab = engine.model().vocab_size;
  absl::StatusOr<needle::engine::Request> request =
      needle::server::RequestFromProto(proto, engine.tokenizer(), vocab, absl::Now() + absl::Seconds(60));
  if (!request.ok()) {
    NEEDLE_FUZZ_CHECK(absl::IsInvalidArgument(request.status()));
    NEEDLE_FUZZ_CHECK(!request.status().message().empty());
    NEEDLE_FUZZ_CHECK(needle::server::ToGrpcStatus(request.status()).error_code() ==
                      grpc::StatusCode::INVALID_ARGUMENT);
    return 0;
  }
  for (int32_t id : request->prompt) NEEDLE_FUZZ_CHECK(id >= 0 && id < vocab);
  const needle::engine::Request copy = *request;
  absl::StatusOr<std::string> id = engine.Submit(*std::move(request), [](needle::engine::RequestEvent&&) {
    NEEDLE_FUZZ_CHECK(false);  // a drained engine never runs a request
  });
  NEEDLE_FUZZ_CHECK(!id.ok());
  NEEDLE_FUZZ_CHECK(IsSubmitRefusal(id.status().code()));
  NEEDLE_FUZZ_CHECK(!id.status().message().empty());
  NEEDLE_FUZZ_CHECK(static_cast<int>(needle::server::ToGrpcStatus(id.status()).error_code()) ==
                    static_cast<int>(id.status().code()));
  if (!absl::IsUnavailable(id.status())) return 0;

  // Accepted by every check: the per-request machinery must cope with any such parameters.
  NEEDLE_FUZZ_CHECK(copy.sampling.Validate().ok() && copy.stopping.Validate().ok());
  needle::engine::Sampler sampler(copy.sampling, copy.sampling.seed.value_or(7), copy.prompt);
  needle::engine::StopMatcher stop(copy.stopping.stop);
  std::vector<float> logits(static_cast<size_t>(vocab));
  uint64_t x = size;
  for (int step = 0; step < 3; ++step) {
    for (float& l : logits) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      l = static_cast<float>(static_cast<int64_t>(x >> 40) % 2000) / 100.0f;
    }
    needle::engine::TokenLogprob lp;
    const int32_t token = sampler.Sample(logits.data(), vocab, copy.return_logprobs ? &lp : nullptr, copy.top_logprobs);
    NEEDLE_FUZZ_CHECK(token >= 0 && token < vocab);
    sampler.Accept(token);
    const std::string bytes = engine.tokenizer().TokenBytes(token);
    stop.Feed(bytes);
  }
  return 0;
}
