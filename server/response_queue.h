// ResponseQueue: the messages of one Generate stream that the engine has produced and gRPC has not
// yet taken, and the slow-reader policy that bounds them. The engine never waits for a client, so a
// client that reads slower than tokens are generated makes this queue grow; the policy is:
//
//   1. Coalescing: while a TokenChunk is still waiting (the reader is at least one whole message
//      behind), new tokens are appended to it rather than queued as new messages; a waiting
//      PrefillProgress is replaced by the newer one. A reader that keeps up sees one token per chunk.
//   2. Bound: tokens waiting in the queue never exceed `max_buffered_tokens`. Push() refuses the
//      event that would exceed it, and the reactor then cancels the request in the engine (freeing
//      its KV pages) and ends the stream with RESOURCE_EXHAUSTED (docs/api.md, "Slow readers").
//
// Not thread-safe: the owning reactor serialises access under its mutex. No gRPC calls.
#pragma once

#include <cstdint>
#include <deque>

#include "needle/v1/generation.pb.h"

namespace needle::server {

class ResponseQueue {
 public:
  explicit ResponseQueue(int64_t max_buffered_tokens) : max_buffered_tokens_(max_buffered_tokens) {}

  // Adds a stream message. Returns false, adding nothing, when its tokens would take the queue
  // over the bound. Finished messages and progress are always accepted (they carry no tokens).
  bool Push(v1::GenerateResponse&& message);
  bool empty() const { return queue_.empty(); }
  size_t size() const { return queue_.size(); }
  // Moves the oldest message into `*out`. The queue must not be empty.
  void Pop(v1::GenerateResponse* out);
  void Clear();

  int64_t buffered_tokens() const { return buffered_tokens_; }
  int64_t max_buffered_tokens() const { return max_buffered_tokens_; }
  // Token events merged into a waiting chunk so far (a measure of how far the reader fell behind).
  int64_t coalesced_events() const { return coalesced_events_; }

 private:
  int64_t max_buffered_tokens_;
  std::deque<v1::GenerateResponse> queue_;
  int64_t buffered_tokens_ = 0;
  int64_t coalesced_events_ = 0;
};

// Appends `from`'s tokens, text, times and logprobs to `to`.
void MergeTokenChunk(v1::TokenChunk&& from, v1::TokenChunk* to);

}  // namespace needle::server
