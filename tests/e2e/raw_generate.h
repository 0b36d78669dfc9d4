// Sends request bytes as a GenerateRequest without the client's serializer, for tests of what a
// careless or hostile client can put on the wire (tests/e2e and tests/reliability share it).
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "grpcpp/grpcpp.h"

namespace needle::e2e {

// Sends `request_bytes` as a serialized GenerateRequest and reads the stream to its end (60 s
// deadline). `tokens`, when not null, receives the number of streamed token ids (the responses are
// parsed).
grpc::Status RawGenerate(const std::shared_ptr<grpc::Channel>& channel, const std::string& request_bytes,
                         size_t* tokens = nullptr);

}  // namespace needle::e2e
