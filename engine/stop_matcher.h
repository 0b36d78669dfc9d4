// StopMatcher: finds a request's stop strings in its generated text as it streams, across token
// boundaries, and decides which text may be sent to the client now. It owns only the text held back
// because it could still be the start of a stop string; it knows nothing of tokens or UTF-8 (text
// that is valid UTF-8 in is cut only at the start of a stop string, which is a character boundary).
//
// Semantics: a stop string matches as soon as its last byte arrives, so the result does not depend
// on how the text is split into Feed() calls. The first match is the one that ends earliest; of
// those ending at the same byte, the one that starts earliest (the longest). On a match the text
// before it is released, the stop string and everything after it are dropped, and the matcher is
// done: later Feed() and Flush() calls return nothing.
#pragma once

#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace needle::engine {

class StopMatcher {
 public:
  struct Result {
    std::string text;      // may be emitted now
    bool matched = false;  // a stop string matched; `text` ends right before it
    int stop_index = -1;   // when matched: which one, an index into the constructor's list
    std::string stop;      // when matched: that string
  };

  // Empty strings never match and are ignored (StoppingCriteria::Validate refuses them anyway).
  explicit StopMatcher(std::vector<std::string> stops);

  // Appends `new_text` to the held text and returns what can no longer be part of a stop string.
  Result Feed(absl::string_view new_text);
  // Generation ended without a match: releases the held text.
  std::string Flush();

  bool stopped() const { return stopped_; }
  // Bytes currently held back (at most the longest stop string's length minus one).
  size_t held_bytes() const { return held_.size(); }

 private:
  // Length of the longest suffix of held_ that is a proper prefix of some stop string.
  size_t LongestPartialSuffix() const;

  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace needle::engine
