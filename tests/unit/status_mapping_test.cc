// The engine-to-gRPC status mapping (server/status_mapping.h): every absl code, and the final status
// of a Generate stream for every finish reason.
#include "server/status_mapping.h"

#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace needle::server {
namespace {

TEST(ToGrpcStatus, OkIsOk) { EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok()); }

TEST(ToGrpcStatus, ApiCodesPassThroughWithTheirMessage) {
  const std::vector<std::pair<absl::Status, grpc::StatusCode>> cases = {
      {absl::InvalidArgumentError("sampling.top_p must be in (0, 1]"), grpc::StatusCode::INVALID_ARGUMENT},
      {absl::OutOfRangeError("prompt plus max_tokens"), grpc::StatusCode::OUT_OF_RANGE},
      {absl::ResourceExhaustedError("queue full"), grpc::StatusCode::RESOURCE_EXHAUSTED},
      {absl::UnavailableError("draining"), grpc::StatusCode::UNAVAILABLE},
      {absl::AlreadyExistsError("request_id \"x\" is already live"), grpc::StatusCode::ALREADY_EXISTS},
      {absl::NotFoundError("no such preset"), grpc::StatusCode::NOT_FOUND},
      {absl::CancelledError("cancelled"), grpc::StatusCode::CANCELLED},
      {absl::DeadlineExceededError("deadline"), grpc::StatusCode::DEADLINE_EXCEEDED},
      {absl::FailedPreconditionError("fp"), grpc::StatusCode::FAILED_PRECONDITION},
      {absl::AbortedError("ab"), grpc::StatusCode::ABORTED},
      {absl::UnimplementedError("no cuda"), grpc::StatusCode::UNIMPLEMENTED},
      {absl::PermissionDeniedError("pd"), grpc::StatusCode::PERMISSION_DENIED},
      {absl::UnauthenticatedError("ua"), grpc::StatusCode::UNAUTHENTICATED},
  };
  for (const auto& [in, code] : cases) {
    const grpc::Status out = ToGrpcStatus(in);
    EXPECT_EQ(out.error_code(), code) << in;
    EXPECT_EQ(out.error_message(), std::string(in.message())) << in;
  }
}

TEST(ToGrpcStatus, EngineFailuresBecomeInternal) {
  for (const absl::Status& in : {absl::InternalError("executor failure: cuda error 700"),
                                 absl::UnknownError("??"), absl::DataLossError("corrupt")}) {
    const grpc::Status out = ToGrpcStatus(in);
    EXPECT_EQ(out.error_code(), grpc::StatusCode::INTERNAL) << in;
    EXPECT_EQ(out.error_message(), std::string(in.message())) << in;
  }
  EXPECT_FALSE(ToGrpcStatus(absl::InternalError("")).error_message().empty());
}

TEST(FinishStatus, NormalEndsAreOk) {
  for (engine::FinishReason r : {engine::FinishReason::kStop, engine::FinishReason::kLength, engine::FinishReason::kEos}) {
    EXPECT_TRUE(FinishStatus(r, absl::OkStatus()).ok()) << engine::FinishReasonName(r);
  }
}

TEST(FinishStatus, CancelledIsCancelledUnlessTheEngineSaysWhy) {
  EXPECT_EQ(FinishStatus(engine::FinishReason::kCancelled, absl::OkStatus()).error_code(),
            grpc::StatusCode::CANCELLED);
  EXPECT_EQ(FinishStatus(engine::FinishReason::kCancelled, absl::CancelledError("aborted")).error_code(),
            grpc::StatusCode::CANCELLED);
  // The engine ends live requests with UNAVAILABLE when the server stops.
  const grpc::Status stopping =
      FinishStatus(engine::FinishReason::kCancelled, absl::UnavailableError("the server is shutting down"));
  EXPECT_EQ(stopping.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(stopping.error_message(), "the server is shutting down");
}

TEST(FinishStatus, DeadlineIsDeadlineExceeded) {
  EXPECT_EQ(FinishStatus(engine::FinishReason::kDeadline, absl::OkStatus()).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  const grpc::Status s =
      FinishStatus(engine::FinishReason::kDeadline, absl::DeadlineExceededError("the request's deadline passed"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(s.error_message(), "the request's deadline passed");
}

TEST(FinishStatus, ErrorIsMappedAndNeverOk) {
  EXPECT_EQ(FinishStatus(engine::FinishReason::kError, absl::InternalError("executor failure")).error_code(),
            grpc::StatusCode::INTERNAL);
  EXPECT_EQ(FinishStatus(engine::FinishReason::kError, absl::OkStatus()).error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_EQ(FinishStatus(engine::FinishReason::kUnspecified, absl::OkStatus()).error_code(),
            grpc::StatusCode::INTERNAL);
  EXPECT_EQ(FinishStatus(engine::FinishReason::kError, absl::ResourceExhaustedError("pool")).error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
}

}  // namespace
}  // namespace needle::server
