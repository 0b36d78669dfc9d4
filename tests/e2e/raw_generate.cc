// See raw_generate.h.
#include "tests/e2e/raw_generate.h"

#include <chrono>
#include <vector>

#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"
#include "needle/v1/generation.pb.h"

namespace needle::e2e {

grpc::Status RawGenerate(const std::shared_ptr<grpc::Channel>& channel, const std::string& request_bytes,
                         size_t* tokens) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto call = stub.PrepareCall(&ctx, "/needle.v1.Generation/Generate", &cq);
  void* tag;
  bool ok;
  auto step = [&](intptr_t id) { return cq.Next(&tag, &ok) && tag == reinterpret_cast<void*>(id); };
  call->StartCall(reinterpret_cast<void*>(1));
  EXPECT_TRUE(step(1));
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer buffer(&slice, 1);
  call->WriteLast(buffer, grpc::WriteOptions(), reinterpret_cast<void*>(2));
  step(2);
  if (tokens != nullptr) *tokens = 0;
  grpc::ByteBuffer response;
  for (;;) {
    call->Read(&response, reinterpret_cast<void*>(3));
    if (!step(3) || !ok) break;
    if (tokens == nullptr) continue;
    std::vector<grpc::Slice> slices;
    if (!response.Dump(&slices).ok()) continue;
    std::string bytes;
    for (const grpc::Slice& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    v1::GenerateResponse m;
    if (m.ParseFromString(bytes) && m.has_tokens()) *tokens += static_cast<size_t>(m.tokens().token_ids_size());
  }
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(4));
  step(4);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return status;
}

}  // namespace needle::e2e
