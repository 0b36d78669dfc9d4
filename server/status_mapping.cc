// absl::Status -> grpc::Status, and the final status of a Generate stream. See status_mapping.h.
#include "server/status_mapping.h"

#include <string>

namespace needle::server {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  std::string message(status.message());
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return grpc::Status::OK;
    case absl::StatusCode::kCancelled:
      return grpc::Status(grpc::StatusCode::CANCELLED, message);
    case absl::StatusCode::kInvalidArgument:
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message);
    case absl::StatusCode::kDeadlineExceeded:
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, message);
    case absl::StatusCode::kNotFound:
      return grpc::Status(grpc::StatusCode::NOT_FOUND, message);
    case absl::StatusCode::kAlreadyExists:
      return grpc::Status(grpc::StatusCode::ALREADY_EXISTS, message);
    case absl::StatusCode::kPermissionDenied:
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, message);
    case absl::StatusCode::kResourceExhausted:
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, message);
    case absl::StatusCode::kFailedPrecondition:
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, message);
    case absl::StatusCode::kAborted:
      return grpc::Status(grpc::StatusCode::ABORTED, message);
    case absl::StatusCode::kOutOfRange:
      return grpc::Status(grpc::StatusCode::OUT_OF_RANGE, message);
    case absl::StatusCode::kUnimplemented:
      return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, message);
    case absl::StatusCode::kUnavailable:
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, message);
    case absl::StatusCode::kUnauthenticated:
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, message);
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kDataLoss:
      break;
    default:  // a code absl adds later: treat as a failure rather than guess its meaning
      break;
  }
  return grpc::Status(grpc::StatusCode::INTERNAL, message.empty() ? "internal engine error" : message);
}

grpc::Status FinishStatus(engine::FinishReason reason, const absl::Status& status) {
  using engine::FinishReason;
  switch (reason) {
    case FinishReason::kStop:
    case FinishReason::kLength:
    case FinishReason::kEos:
      return grpc::Status::OK;
    case FinishReason::kCancelled:
      return ToGrpcStatus(status.ok() ? absl::CancelledError("the request was cancelled") : status);
    case FinishReason::kDeadline:
      return ToGrpcStatus(absl::DeadlineExceededError(
          status.ok() || status.message().empty() ? "the request's deadline passed" : status.message()));
    case FinishReason::kError:
    case FinishReason::kUnspecified:
      break;
  }
  if (status.ok()) return ToGrpcStatus(absl::InternalError("the engine ended the request without a reason"));
  return ToGrpcStatus(status);
}

}  // namespace needle::server
