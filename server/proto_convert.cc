// needle.v1 <-> engine conversions. See proto_convert.h.
#include "server/proto_convert.h"

#include <algorithm>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"

namespace needle::server {
namespace {

constexpr uint32_t kInt32Max = static_cast<uint32_t>(std::numeric_limits<int32_t>::max());

absl::Status IdOutsideVocab(absl::string_view field, size_t index, uint32_t id, int vocab_size) {
  return absl::InvalidArgumentError(absl::StrCat(field, "[", index, "]: id ", id,
                                                 " is outside the vocabulary [0, ", vocab_size, ")"));
}

const char* CompressionName(engine::Compression c) {
  switch (c) {
    case engine::Compression::kMeanPostRope:
      return "mean-post-rope";
    case engine::Compression::kMlpPreRope:
      return "mlp-pre-rope";
  }
  return "unknown";
}

}  // namespace

absl::StatusOr<std::vector<int32_t>> EncodeText(const std::string& text, const engine::Tokenizer& tokenizer,
                                                const char* field) {
  // proto3 parsers reject invalid UTF-8 in string fields before we see it; this check covers
  // requests built in-process and senders that skip the check.
  if (!engine::IsValidUtf8(text)) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": not valid UTF-8"));
  }
  absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(text);
  if (!ids.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": ", ids.status().message()));
  }
  return ids;
}

absl::StatusOr<engine::Request> RequestFromProto(const v1::GenerateRequest& proto,
                                                 const engine::Tokenizer& tokenizer, int vocab_size,
                                                 absl::Time deadline) {
  engine::Request r;
  if (proto.request_id().size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("request_id: ", proto.request_id().size(),
                                                   " bytes, at most ", kMaxRequestIdBytes, " are allowed"));
  }
  r.id = proto.request_id();

  switch (proto.input_case()) {
    case v1::GenerateRequest::kText: {
      if (proto.text().empty()) return absl::InvalidArgumentError("input.text: empty");
      absl::StatusOr<std::vector<int32_t>> ids = EncodeText(proto.text(), tokenizer, "input.text");
      if (!ids.ok()) return ids.status();
      r.prompt = *std::move(ids);
      if (r.prompt.empty()) return absl::InvalidArgumentError("input.text: encodes to no tokens");
      break;
    }
    case v1::GenerateRequest::kTokenIds: {
      const auto& ids = proto.token_ids().ids();
      if (ids.empty()) return absl::InvalidArgumentError("input.token_ids.ids: empty");
      r.prompt.reserve(ids.size());
      for (int i = 0; i < ids.size(); ++i) {
        if (ids[i] >= static_cast<uint32_t>(vocab_size)) {
          return IdOutsideVocab("input.token_ids.ids", i, ids[i], vocab_size);
        }
        r.prompt.push_back(static_cast<int32_t>(ids[i]));
      }
      break;
    }
    case v1::GenerateRequest::INPUT_NOT_SET:
      return absl::InvalidArgumentError("input: set either text or token_ids");
  }

  const v1::SamplingParams& s = proto.sampling();
  if (s.has_temperature()) r.sampling.temperature = s.temperature();
  if (s.has_top_p()) r.sampling.top_p = s.top_p();
  // Any top_k at or above the vocabulary means no limit, so clamping cannot change the result.
  if (s.has_top_k()) r.sampling.top_k = static_cast<int>(std::min(s.top_k(), kInt32Max));
  if (s.has_min_p()) r.sampling.min_p = s.min_p();
  if (s.has_repetition_penalty()) r.sampling.repetition_penalty = s.repetition_penalty();
  if (s.has_presence_penalty()) r.sampling.presence_penalty = s.presence_penalty();
  if (s.has_frequency_penalty()) r.sampling.frequency_penalty = s.frequency_penalty();
  if (s.has_seed()) r.sampling.seed = s.seed();

  const v1::StoppingCriteria& st = proto.stopping();
  if (st.has_max_tokens()) r.stopping.max_tokens = static_cast<int64_t>(st.max_tokens());
  r.stopping.stop.assign(st.stop().begin(), st.stop().end());
  r.stopping.stop_token_ids.reserve(st.stop_token_ids_size());
  for (int i = 0; i < st.stop_token_ids_size(); ++i) {
    const uint32_t id = st.stop_token_ids(i);
    if (id >= static_cast<uint32_t>(vocab_size)) {
      return IdOutsideVocab("stopping.stop_token_ids", i, id, vocab_size);
    }
    r.stopping.stop_token_ids.push_back(static_cast<int32_t>(id));
  }
  r.stopping.ignore_eos = st.ignore_eos();

  r.return_logprobs = proto.return_logprobs();
  // The engine allows [0, 20]; clamping keeps an absurd value absurd without overflowing int.
  r.top_logprobs = static_cast<int>(std::min(proto.top_logprobs(), kInt32Max));
  r.deadline = deadline;
  return r;
}

absl::Time DeadlineFromChrono(std::chrono::system_clock::time_point deadline) {
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

v1::FinishReason FinishReasonToProto(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kUnspecified:
      return v1::FINISH_REASON_UNSPECIFIED;
    case engine::FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case engine::FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case engine::FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    case engine::FinishReason::kDeadline:
      return v1::FINISH_REASON_DEADLINE;
    case engine::FinishReason::kError:
      return v1::FINISH_REASON_ERROR;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

void AppendTokens(const engine::RequestEvent& event, v1::TokenChunk* chunk) {
  for (int32_t id : event.token_ids) chunk->add_token_ids(static_cast<uint32_t>(id));
  chunk->mutable_text()->append(event.text);
  for (double t : event.token_times_s) chunk->add_token_times_s(t);
  for (const engine::TokenLogprob& lp : event.logprobs) {
    v1::TokenLogprob* out = chunk->add_logprobs();
    out->set_token_id(static_cast<uint32_t>(lp.id));
    out->set_logprob(lp.logprob);
    for (const auto& [id, logprob] : lp.top) {
      v1::TopLogprob* top = out->add_top();
      top->set_token_id(static_cast<uint32_t>(id));
      top->set_logprob(logprob);
    }
  }
}

void EventToProto(const engine::RequestEvent& event, v1::GenerateResponse* out) {
  out->set_request_id(event.request_id);
  switch (event.kind) {
    case engine::RequestEvent::Kind::kPrefillProgress: {
      v1::PrefillProgress* p = out->mutable_progress();
      p->set_prefilled_tokens(static_cast<uint64_t>(event.prefilled_tokens));
      p->set_prompt_tokens(static_cast<uint64_t>(event.prompt_tokens));
      break;
    }
    case engine::RequestEvent::Kind::kTokens:
      AppendTokens(event, out->mutable_tokens());
      break;
    case engine::RequestEvent::Kind::kFinished: {
      v1::Finished* f = out->mutable_finished();
      f->set_reason(FinishReasonToProto(event.reason));
      f->set_matched_stop(event.matched_stop);
      f->mutable_usage()->set_prompt_tokens(static_cast<uint64_t>(event.usage.prompt_tokens));
      f->mutable_usage()->set_completion_tokens(static_cast<uint64_t>(event.usage.completion_tokens));
      v1::Timings* t = f->mutable_timings();
      t->set_queue_s(event.timings.queue_s);
      t->set_prefill_s(event.timings.prefill_s);
      t->set_first_token_s(event.timings.first_token_s);
      t->set_decode_s(event.timings.decode_s);
      if (!event.status.ok()) f->set_message(std::string(event.status.message()));
      break;
    }
  }
}

v1::ModelInfo ModelInfoToProto(const engine::ModelConfig& config, const std::string& model,
                               const std::string& tokenizer, const std::string& backend, int page_tokens) {
  v1::ModelInfo info;
  info.set_model(model);
  info.set_architecture(std::string(engine::ArchitectureName(config.arch)));
  info.set_vocab_size(static_cast<uint32_t>(config.vocab_size));
  info.set_max_context(static_cast<uint32_t>(config.max_position_embeddings));
  if (config.bos_token_id >= 0) info.set_bos_token_id(static_cast<uint32_t>(config.bos_token_id));
  if (config.eos_token_id >= 0) info.set_eos_token_id(static_cast<uint32_t>(config.eos_token_id));
  info.set_tokenizer(tokenizer);
  info.set_num_layers(static_cast<uint32_t>(config.num_layers));
  info.set_hidden_size(static_cast<uint32_t>(config.hidden_size));
  info.set_num_heads(static_cast<uint32_t>(config.num_heads));
  info.set_num_kv_heads(static_cast<uint32_t>(config.num_kv_heads));
  info.set_head_dim_qk(static_cast<uint32_t>(config.head_dim_qk));
  info.set_head_dim_v(static_cast<uint32_t>(config.head_dim_v));
  if (config.IsNsa()) {
    const engine::NsaParams& n = config.nsa;
    v1::NsaParams* p = info.mutable_nsa();
    p->set_cmp_block(static_cast<uint32_t>(n.cmp_block));
    p->set_cmp_stride(static_cast<uint32_t>(n.cmp_stride));
    p->set_sel_block(static_cast<uint32_t>(n.sel_block));
    p->set_num_selected(static_cast<uint32_t>(n.num_selected));
    p->set_forced_initial(static_cast<uint32_t>(n.forced_initial));
    p->set_forced_local(static_cast<uint32_t>(n.forced_local));
    p->set_window(static_cast<uint32_t>(n.window));
    p->set_compression(CompressionName(n.compression));
    p->set_shared_kv(n.shared_kv);
  }
  info.set_backend(backend);
  info.set_page_tokens(static_cast<uint32_t>(page_tokens));
  return info;
}

v1::ServerStats StatsToProto(const engine::EngineStats& stats) {
  v1::ServerStats out;
  out.set_running(static_cast<uint32_t>(stats.running));
  out.set_waiting(static_cast<uint32_t>(stats.waiting));
  for (const engine::PoolStats& p : stats.pools) {
    if (!p.present) continue;
    v1::CachePool* pool = out.add_pools();
    pool->set_name(p.name ? p.name : "");
    pool->set_total_pages(static_cast<uint64_t>(p.total));
    pool->set_free_pages(static_cast<uint64_t>(p.free));
  }
  out.set_finished(static_cast<uint64_t>(stats.finished));
  out.set_cancelled(static_cast<uint64_t>(stats.cancelled));
  out.set_refused(static_cast<uint64_t>(stats.refused));
  out.set_preempted(static_cast<uint64_t>(stats.preempted));
  out.set_failed(static_cast<uint64_t>(stats.failed));
  out.set_steps(static_cast<uint64_t>(stats.steps));
  out.set_healthy(stats.healthy);
  out.set_draining(stats.draining);
  return out;
}

}  // namespace needle::server
