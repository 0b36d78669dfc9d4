// The slow-reader policy of a Generate stream. See response_queue.h.
#include "server/response_queue.h"

#include <utility>

namespace needle::server {

void MergeTokenChunk(v1::TokenChunk&& from, v1::TokenChunk* to) {
  to->mutable_token_ids()->MergeFrom(from.token_ids());
  to->mutable_text()->append(from.text());
  to->mutable_token_times_s()->MergeFrom(from.token_times_s());
  for (v1::TokenLogprob& lp : *from.mutable_logprobs()) *to->add_logprobs() = std::move(lp);
}

bool ResponseQueue::Push(v1::GenerateResponse&& message) {
  const int64_t tokens = message.has_tokens() ? message.tokens().token_ids_size() : 0;
  if (tokens > 0 && buffered_tokens_ + tokens > max_buffered_tokens_) return false;
  buffered_tokens_ += tokens;
  if (!queue_.empty()) {
    v1::GenerateResponse& back = queue_.back();
    if (message.has_tokens() && back.has_tokens()) {
      MergeTokenChunk(std::move(*message.mutable_tokens()), back.mutable_tokens());
      ++coalesced_events_;
      return true;
    }
    if (message.has_progress() && back.has_progress()) {
      back = std::move(message);
      return true;
    }
  }
  queue_.push_back(std::move(message));
  return true;
}

void ResponseQueue::Pop(v1::GenerateResponse* out) {
  *out = std::move(queue_.front());
  queue_.pop_front();
  if (out->has_tokens()) buffered_tokens_ -= out->tokens().token_ids_size();
}

void ResponseQueue::Clear() {
  queue_.clear();
  buffered_tokens_ = 0;
}

}  // namespace needle::server
