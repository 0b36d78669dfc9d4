// Validation of SamplingParams and StoppingCriteria at every documented boundary, and the finish
// reason names. Each rejection must be INVALID_ARGUMENT and name the field.
#include "engine/request.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <limits>
#include <string>

namespace needle::engine {
namespace {

using ::testing::HasSubstr;

constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

void ExpectRejected(const absl::Status& s, const std::string& field) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(field));
}

TEST(SamplingParams, DefaultsAreValid) { EXPECT_TRUE(SamplingParams{}.Validate().ok()); }

TEST(SamplingParams, Temperature) {
  SamplingParams p;
  for (float ok : {0.0f, 0.5f, 1.0f, 100.0f}) {
    p.temperature = ok;
    EXPECT_TRUE(p.Validate().ok()) << ok;
  }
  p.temperature = -1;
  ExpectRejected(p.Validate(), "sampling.temperature");
  p.temperature = kNan;
  EXPECT_EQ(p.Validate().message(), "sampling.temperature must be finite and >= 0, got nan");
  p.temperature = kInf;
  ExpectRejected(p.Validate(), "sampling.temperature");
  EXPECT_THAT(std::string(p.Validate().message()), HasSubstr("got inf"));
}

TEST(SamplingParams, TopP) {
  SamplingParams p;
  for (float ok : {1.0f, 0.5f, 1e-6f}) {
    p.top_p = ok;
    EXPECT_TRUE(p.Validate().ok()) << ok;
  }
  for (float bad : {0.0f, 1.0001f, -0.5f, kNan, kInf, -kInf}) {
    p.top_p = bad;
    ExpectRejected(p.Validate(), "sampling.top_p");
  }
}

TEST(SamplingParams, TopK) {
  SamplingParams p;
  p.top_k = 0;
  EXPECT_TRUE(p.Validate().ok());
  p.top_k = 1;
  EXPECT_TRUE(p.Validate().ok());
  p.top_k = -1;
  ExpectRejected(p.Validate(), "sampling.top_k");
}

TEST(SamplingParams, MinP) {
  SamplingParams p;
  for (float ok : {0.0f, 0.5f, 1.0f}) {
    p.min_p = ok;
    EXPECT_TRUE(p.Validate().ok()) << ok;
  }
  for (float bad : {-0.1f, 1.1f, kNan, kInf}) {
    p.min_p = bad;
    ExpectRejected(p.Validate(), "sampling.min_p");
  }
}

TEST(SamplingParams, RepetitionPenalty) {
  SamplingParams p;
  for (float ok : {1.0f, 0.01f, 10.0f}) {
    p.repetition_penalty = ok;
    EXPECT_TRUE(p.Validate().ok()) << ok;
  }
  for (float bad : {0.0f, -1.0f, 10.01f, kNan, kInf}) {
    p.repetition_penalty = bad;
    ExpectRejected(p.Validate(), "sampling.repetition_penalty");
  }
}

TEST(SamplingParams, PresenceAndFrequencyPenalties) {
  SamplingParams p;
  for (float ok : {-2.0f, 0.0f, 2.0f}) {
    p.presence_penalty = ok;
    p.frequency_penalty = ok;
    EXPECT_TRUE(p.Validate().ok()) << ok;
  }
  p.frequency_penalty = 0;
  for (float bad : {-2.01f, 2.01f, kNan, kInf, -kInf}) {
    p.presence_penalty = bad;
    ExpectRejected(p.Validate(), "sampling.presence_penalty");
  }
  p.presence_penalty = 0;
  for (float bad : {-2.01f, 2.01f, kNan, kInf, -kInf}) {
    p.frequency_penalty = bad;
    ExpectRejected(p.Validate(), "sampling.frequency_penalty");
  }
}

TEST(StoppingCriteria, DefaultsAreValid) { EXPECT_TRUE(StoppingCriteria{}.Validate().ok()); }

TEST(StoppingCriteria, MaxTokens) {
  StoppingCriteria c;
  c.max_tokens = 1;
  EXPECT_TRUE(c.Validate().ok());
  c.max_tokens = 0;
  ExpectRejected(c.Validate(), "stopping.max_tokens");
  c.max_tokens = -5;
  ExpectRejected(c.Validate(), "stopping.max_tokens");
}

TEST(StoppingCriteria, StopStringCount) {
  StoppingCriteria c;
  c.stop.assign(kMaxStopStrings, "x");
  EXPECT_TRUE(c.Validate().ok());
  c.stop.push_back("y");
  ExpectRejected(c.Validate(), "stopping.stop");
}

TEST(StoppingCriteria, StopStringLength) {
  StoppingCriteria c;
  c.stop = {"ok", std::string(kMaxStopStringBytes, 'a')};
  EXPECT_TRUE(c.Validate().ok());
  c.stop[1].push_back('a');
  ExpectRejected(c.Validate(), "stopping.stop[1]");
}

TEST(StoppingCriteria, EmptyStopString) {
  StoppingCriteria c;
  c.stop = {"a", ""};
  ExpectRejected(c.Validate(), "stopping.stop[1]");
}

TEST(StoppingCriteria, StopStringMustBeUtf8) {
  StoppingCriteria c;
  c.stop = {"caf\xC3\xA9", "\xF0\x9F\x98\x80"};  // "café", U+1F600
  EXPECT_TRUE(c.Validate().ok());
  c.stop = {"fine", "bad\xC3"};  // truncated two-byte sequence
  ExpectRejected(c.Validate(), "stopping.stop[1]");
  c.stop = {"\xED\xA0\x80"};  // a surrogate
  ExpectRejected(c.Validate(), "stopping.stop[0]");
}

TEST(StoppingCriteria, StopTokenIds) {
  StoppingCriteria c;
  c.stop_token_ids.assign(kMaxStopTokenIds, 0);
  EXPECT_TRUE(c.Validate().ok());
  c.stop_token_ids.push_back(1);
  ExpectRejected(c.Validate(), "stopping.stop_token_ids");
  c.stop_token_ids = {5, -1};
  ExpectRejected(c.Validate(), "stopping.stop_token_ids[1]");
}

TEST(FinishReason, Names) {
  EXPECT_STREQ(FinishReasonName(FinishReason::kUnspecified), "unspecified");
  EXPECT_STREQ(FinishReasonName(FinishReason::kStop), "stop");
  EXPECT_STREQ(FinishReasonName(FinishReason::kLength), "length");
  EXPECT_STREQ(FinishReasonName(FinishReason::kEos), "eos");
  EXPECT_STREQ(FinishReasonName(FinishReason::kCancelled), "cancelled");
  EXPECT_STREQ(FinishReasonName(FinishReason::kDeadline), "deadline");
  EXPECT_STREQ(FinishReasonName(FinishReason::kError), "error");
}

}  // namespace
}  // namespace needle::engine
