// Fuzz target: config.json parsing. Arbitrary bytes are parsed as JSON (nlohmann, no exceptions);
// whatever parses goes through ModelConfigFromJson (engine/model_config.h). It must never crash or
// hit undefined behaviour; a refusal is INVALID_ARGUMENT naming the source; an accepted config passes
// Validate() and round-trips: ModelConfigFromJson(ModelConfigToJson(c)) == c, as the header promises.
#include <cstddef>
#include <cstdint>

#include "engine/model_config.h"
#include "fuzz/fuzz_check.h"
#include "nlohmann/json.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const nlohmann::json j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  absl::StatusOr<needle::engine::ModelConfig> config = needle::engine::ModelConfigFromJson(j, "fuzz/config.json");
  if (!config.ok()) {
    NEEDLE_FUZZ_CHECK(absl::IsInvalidArgument(config.status()));
    NEEDLE_FUZZ_CHECK(config.status().message().find("fuzz/config.json") != absl::string_view::npos);
    return 0;
  }
  NEEDLE_FUZZ_CHECK(config->Validate().ok());
  const nlohmann::json written = needle::engine::ModelConfigToJson(*config);
  absl::StatusOr<needle::engine::ModelConfig> again = needle::engine::ModelConfigFromJson(written, "round trip");
  if (!again.ok()) std::fprintf(stderr, "round trip refused: %s\n", again.status().ToString().c_str());
  NEEDLE_FUZZ_CHECK(again.ok());
  NEEDLE_FUZZ_CHECK(*again == *config);
  // The NSA index arithmetic over the whole context stays in range.
  if (config->IsNsa()) {
    const int64_t last = config->max_position_embeddings - 1;
    NEEDLE_FUZZ_CHECK(config->nsa.NumCompressed(last) >= 0);
    NEEDLE_FUZZ_CHECK(config->nsa.NumSelectionBlocks(last) >= 1);
  }
  return 0;
}
