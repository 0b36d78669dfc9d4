// The one place engine statuses become gRPC statuses. The engine speaks absl::Status (its codes
// already chosen to match the API: INVALID_ARGUMENT names the field, OUT_OF_RANGE for prompts that
// do not fit, RESOURCE_EXHAUSTED, UNAVAILABLE while draining, ALREADY_EXISTS for a live request id);
// the server never invents codes of its own elsewhere. Knows nothing of reactors or protos.
#pragma once

#include "absl/status/status.h"
#include "engine/request.h"
#include "grpcpp/support/status.h"

namespace needle::server {

// Maps an engine status to the gRPC status returned to the client, keeping the message. Codes the
// API uses pass through unchanged; UNKNOWN, INTERNAL and DATA_LOSS (an engine or device failure)
// become INTERNAL. Table: docs/api.md, "Status codes".
grpc::Status ToGrpcStatus(const absl::Status& status);

// The status that ends a Generate stream whose request finished with `reason`; `status` is the
// engine's explanation (OK for STOP/LENGTH/EOS). STOP, LENGTH, EOS -> OK; CANCELLED -> CANCELLED
// (or the engine's own code, e.g. UNAVAILABLE when the server shut down); DEADLINE ->
// DEADLINE_EXCEEDED; ERROR -> the engine's status mapped, INTERNAL when it carries no error.
grpc::Status FinishStatus(engine::FinishReason reason, const absl::Status& status);

}  // namespace needle::server
