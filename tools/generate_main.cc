// needle-generate: offline generation for one prompt on the same engine path the server uses
// (BuildEngine, Submit, the engine thread, sampling and stop checks), printing the text or one JSON
// object. --dump-logits writes the logits of chosen positions of prompt + completion, recomputed
// with a fresh cache, for comparing backends and checkpoints.
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "engine/base/flags.h"
#include "engine/builder.h"
#include "engine/cpu_executor.h"
#include "engine/presets.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/cuda_backend.h"
#endif

ABSL_FLAG(std::string, model, "demo", "model: a preset name or a checkpoint directory");
ABSL_FLAG(uint64_t, model_seed, 0, "seed of a synthetic preset's weights");
ABSL_FLAG(std::string, prompt, "", "prompt text");
ABSL_FLAG(std::string, prompt_ids, "", "file of prompt token ids separated by whitespace or commas");
ABSL_FLAG(int64_t, max_tokens, 32, "tokens to generate at most");
ABSL_FLAG(double, temperature, 0.0, "sampling temperature; 0 = greedy");
ABSL_FLAG(double, top_p, 1.0, "nucleus sampling mass");
ABSL_FLAG(int, top_k, 0, "top-k sampling; 0 = off");
ABSL_FLAG(uint64_t, seed, 0, "sampling seed");
ABSL_FLAG(bool, ignore_eos, false, "keep generating after EOS");
ABSL_FLAG(std::string, backend, "cpu", "cpu | cuda | auto");
ABSL_FLAG(int64_t, kv_cache_bytes, 256ll << 20, "bytes of KV cache");
ABSL_FLAG(double, kv_cache_fraction, 0,
          "cuda: size the KV cache as this fraction of the device memory left after weights and buffers "
          "(0: use --kv_cache_bytes)");
ABSL_FLAG(int, prefill_chunk, 512, "prompt tokens per step");
ABSL_FLAG(bool, cuda_graphs, true,
          "cuda backend: replay pure-decode steps from CUDA graphs captured per batch bucket; false runs every "
          "step launch by launch");
ABSL_FLAG(bool, json, false, "print one JSON object instead of the text");
ABSL_FLAG(std::string, dump_logits, "", "write logits of --dump_positions to this JSON file");
ABSL_FLAG(std::string, dump_positions, "-1",
          "comma-separated positions of prompt + completion to dump (negative: from the end)");

namespace needle {
namespace {

absl::StatusOr<std::vector<int32_t>> ReadIds(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(path + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  std::vector<int32_t> ids;
  for (absl::string_view tok : absl::StrSplit(ss.str(), absl::ByAnyChar(" \t\r\n,"), absl::SkipEmpty())) {
    int32_t v;
    if (!absl::SimpleAtoi(tok, &v)) return absl::InvalidArgumentError(path + ": not a token id: " + std::string(tok));
    ids.push_back(v);
  }
  return ids;
}

// Logits of every position of `tokens`, from a fresh cache, prefilled in one chunk.
absl::StatusOr<std::vector<float>> AllLogits(const engine::ModelWeights& w, const std::vector<int32_t>& tokens) {
  const engine::ModelConfig& m = w.config;
  const int page = m.IsNsa() && m.nsa.sel_block > 64 ? m.nsa.sel_block : (m.IsNsa() ? ((64 + m.nsa.sel_block - 1) / m.nsa.sel_block) * m.nsa.sel_block : 64);
  engine::KvCacheConfig cache = engine::SizePools(m, 1, 4, static_cast<int64_t>(tokens.size()), page);
  engine::KvCacheManager kv(m, cache);
  engine::CpuExecutor exec(w, cache);
  auto r = kv.Plan(1, static_cast<int64_t>(tokens.size()));
  if (!r.ok()) return r.status();
  kv.Commit(*r);
  engine::StepPlan plan;
  plan.seqs.push_back({1, 0, tokens, &kv.Pages(1), /*all_logits=*/true});
  engine::StepOutput out;
  if (absl::Status s = exec.Run(plan, &out); !s.ok()) return s;
  return std::move(out.logits);
}

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage("needle-generate --model demo --prompt 'text' [--max-tokens N] [--json]");
  std::vector<std::string> args = NormalizeFlagNames(argc, argv);
  std::vector<char*> cargs;
  for (auto& a : args) cargs.push_back(a.data());
  absl::ParseCommandLine(static_cast<int>(cargs.size()), cargs.data());
  spdlog::set_level(spdlog::level::warn);
#ifdef NEEDLE_HAVE_CUDA
  engine::cuda::CudaBackendOptions cuda_options;
  cuda_options.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  engine::cuda::RegisterCudaBackend(cuda_options);
#endif

  engine::EngineOptions opts;
  opts.model = absl::GetFlag(FLAGS_model);
  opts.model_seed = absl::GetFlag(FLAGS_model_seed);
  opts.backend = absl::GetFlag(FLAGS_backend);
  opts.kv_cache_bytes = absl::GetFlag(FLAGS_kv_cache_bytes);
  opts.kv_cache_fraction = absl::GetFlag(FLAGS_kv_cache_fraction);
  opts.engine.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  opts.engine.stats_log_interval_s = 0;
  const absl::Time t_load = absl::Now();
  auto eng = engine::BuildEngine(opts);
  if (!eng.ok()) {
    std::cerr << "needle-generate: " << eng.status().message() << "\n";
    return 2;
  }
  engine::Engine& e = **eng;
  const double load_s = absl::ToDoubleSeconds(absl::Now() - t_load);

  engine::Request req;
  if (!absl::GetFlag(FLAGS_prompt_ids).empty()) {
    auto ids = ReadIds(absl::GetFlag(FLAGS_prompt_ids));
    if (!ids.ok()) {
      std::cerr << "needle-generate: " << ids.status().message() << "\n";
      return 2;
    }
    req.prompt = *ids;
  } else {
    auto ids = e.tokenizer().Encode(absl::GetFlag(FLAGS_prompt));
    if (!ids.ok()) {
      std::cerr << "needle-generate: --prompt: " << ids.status().message() << "\n";
      return 2;
    }
    req.prompt = *ids;
  }
  req.sampling.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  req.sampling.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  req.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  req.sampling.seed = absl::GetFlag(FLAGS_seed);
  req.stopping.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  req.stopping.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);

  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  engine::RequestEvent finished;
  std::vector<int32_t> generated;
  std::string text;
  const bool json = absl::GetFlag(FLAGS_json);
  auto submitted = e.Submit(std::move(req), [&](engine::RequestEvent&& ev) {
    std::lock_guard<std::mutex> lock(mu);
    if (ev.kind == engine::RequestEvent::Kind::kTokens) {
      generated.insert(generated.end(), ev.token_ids.begin(), ev.token_ids.end());
      text += ev.text;
      if (!json) {
        std::fwrite(ev.text.data(), 1, ev.text.size(), stdout);
        std::fflush(stdout);
      }
    } else if (ev.kind == engine::RequestEvent::Kind::kFinished) {
      finished = std::move(ev);
      done = true;
      cv.notify_all();
    }
  });
  if (!submitted.ok()) {
    std::cerr << "needle-generate: " << submitted.status().ToString() << "\n";
    return 2;
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done; });
  }
  if (!finished.status.ok()) {
    std::cerr << "needle-generate: " << finished.status.ToString() << "\n";
    return 1;
  }
  const std::vector<int32_t> prompt_ids = [&] {
    auto ids = !absl::GetFlag(FLAGS_prompt_ids).empty() ? ReadIds(absl::GetFlag(FLAGS_prompt_ids))
                                                        : e.tokenizer().Encode(absl::GetFlag(FLAGS_prompt));
    return *ids;
  }();

  if (!absl::GetFlag(FLAGS_dump_logits).empty()) {
    auto loaded = engine::LoadModel(opts.model, opts.model_seed);
    if (!loaded.ok()) {
      std::cerr << "needle-generate: " << loaded.status().message() << "\n";
      return 1;
    }
    std::vector<int32_t> all = prompt_ids;
    all.insert(all.end(), generated.begin(), generated.end());
    auto logits = AllLogits(*loaded, all);
    if (!logits.ok()) {
      std::cerr << "needle-generate: " << logits.status().message() << "\n";
      return 1;
    }
    nlohmann::json dump;
    dump["model"] = opts.model;
    dump["tokens"] = all;
    const int vocab = loaded->config.vocab_size;
    for (absl::string_view p : absl::StrSplit(absl::GetFlag(FLAGS_dump_positions), ',', absl::SkipEmpty())) {
      int64_t pos;
      if (!absl::SimpleAtoi(p, &pos) || pos < -static_cast<int64_t>(all.size()) || pos >= static_cast<int64_t>(all.size())) {
        std::cerr << "needle-generate: --dump_positions: bad position " << p << "\n";
        return 2;
      }
      if (pos < 0) pos += static_cast<int64_t>(all.size());
      const float* row = logits->data() + pos * vocab;
      dump["logits"][std::to_string(pos)] = std::vector<float>(row, row + vocab);
    }
    std::ofstream(absl::GetFlag(FLAGS_dump_logits)) << dump.dump() << "\n";
  }

  if (json) {
    nlohmann::json j;
    j["model"] = opts.model;
    j["prompt_tokens"] = prompt_ids.size();
    j["generated"] = generated;
    j["text"] = text;
    j["finish_reason"] = engine::FinishReasonName(finished.reason);
    j["timings"] = {{"load_s", load_s},
                    {"queue_s", finished.timings.queue_s},
                    {"prefill_s", finished.timings.prefill_s},
                    {"first_token_s", finished.timings.first_token_s},
                    {"decode_s", finished.timings.decode_s}};
    // Mean time per decode step: the first token comes from the prefill, every later one from a step.
    if (generated.size() >= 2) {
      j["timings"]["decode_ms_per_token"] = 1e3 * finished.timings.decode_s / static_cast<double>(generated.size() - 1);
    }
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << std::endl;
  }
  return 0;
}

}  // namespace
}  // namespace needle

int main(int argc, char** argv) { return needle::Main(argc, argv); }
