// Monitoring: engine::LatencyHistogram's buckets on hand-picked values (bounds are inclusive), and
// server::RenderMetrics's Prometheus text for a hand-built EngineStats: the values, the cumulative
// histogram buckets worked out by hand, label escaping, absent pools, the not-loaded form, and the
// exposition format's grammar on every line.
#include "server/metrics.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "engine/metrics.h"

namespace needle::server {
namespace {

using engine::LatencyHistogram;

TEST(LatencyHistogram, ValuesGoToTheFirstBucketWhoseBoundHoldsThem) {
  LatencyHistogram h;
  h.Observe(0.001);      // exactly the first bound: bucket 0
  h.Observe(0.0010001);  // just above: bucket 1 (le 0.0025)
  h.Observe(0.3);        // bucket 8 (le 0.5)
  h.Observe(600);        // the last bound: bucket 17
  h.Observe(601);        // beyond every bound: bucket 18
  h.Observe(-2);         // clamped to 0: bucket 0
  h.Observe(std::numeric_limits<double>::quiet_NaN());  // counted as 0: bucket 0
  EXPECT_EQ(h.buckets[0], 3);
  EXPECT_EQ(h.buckets[1], 1);
  EXPECT_EQ(h.buckets[8], 1);
  EXPECT_EQ(h.buckets[17], 1);
  EXPECT_EQ(h.buckets[18], 1);
  EXPECT_EQ(h.count, 7);
  EXPECT_DOUBLE_EQ(h.sum, 0.001 + 0.0010001 + 0.3 + 600 + 601);
  int64_t n = 0;
  for (int64_t c : h.buckets) n += c;
  EXPECT_EQ(n, 7);
}

// name{labels} -> value, for every sample line; also checks each line's grammar and that every
// sample belongs to a family declared (HELP and TYPE, once each) before it.
std::map<std::string, double> ParseExposition(const std::string& text) {
  static const std::regex kHelp(R"(# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) .+)");
  static const std::regex kType(R"(# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram))");
  static const std::regex kSample(
      R"(([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*\})? (\S+))");
  std::map<std::string, double> samples;
  std::map<std::string, std::string> types;
  std::set<std::string> helped;
  std::istringstream in(text);
  std::string line;
  std::smatch m;
  while (std::getline(in, line)) {
    if (std::regex_match(line, m, kHelp)) {
      EXPECT_TRUE(helped.insert(m[1]).second) << "HELP twice: " << line;
    } else if (std::regex_match(line, m, kType)) {
      EXPECT_TRUE(helped.count(m[1])) << "TYPE before HELP: " << line;
      EXPECT_TRUE(types.emplace(m[1], m[2]).second) << "TYPE twice: " << line;
    } else if (std::regex_match(line, m, kSample)) {
      std::string family = m[1];
      for (const char* suffix : {"_bucket", "_sum", "_count"}) {
        const std::string base = family.substr(0, family.size() - std::min(family.size(), std::strlen(suffix)));
        if (family.size() > std::strlen(suffix) && family.compare(base.size(), std::string::npos, suffix) == 0 &&
            types.count(base) && types[base] == "histogram") {
          family = base;
        }
      }
      EXPECT_TRUE(types.count(family)) << "sample of an undeclared family: " << line;
      size_t used = 0;
      const std::string value = m[3];
      const double v = value == "+Inf" ? std::numeric_limits<double>::infinity() : std::stod(value, &used);
      if (value != "+Inf") {
        EXPECT_EQ(used, value.size()) << line;
      }
      EXPECT_TRUE(samples.emplace(std::string(m[1]) + std::string(m[2]), v).second) << "sample twice: " << line;
    } else {
      ADD_FAILURE() << "not exposition format: \"" << line << "\"";
    }
  }
  EXPECT_FALSE(text.empty());
  EXPECT_EQ(text.back(), '\n');
  return samples;
}

TEST(RenderMetrics, ReportsTheStatsInPrometheusFormat) {
  engine::EngineStats s;
  s.running = 2;
  s.waiting = 3;
  s.finished = 7;
  s.cancelled = 1;
  s.failed = 0;
  s.refused = 4;
  s.steps = 99;
  s.healthy = true;
  s.draining = true;
  s.pools = {{"selection", true, 10, 4}, {"compressed", false, 0, 0}, {"window", true, 8, 8}};
  s.metrics.prompt_tokens = 1000;
  s.metrics.generation_tokens = 50;
  s.metrics.time_to_first_token.Observe(0.003);
  s.metrics.time_to_first_token.Observe(0.2);
  s.metrics.time_to_first_token.Observe(100);
  const std::string text = RenderMetrics({"a\"b\\c\nd", "cpu"}, &s);
  const std::map<std::string, double> v = ParseExposition(text);

  EXPECT_EQ(v.at(R"(needle_model_info{model="a\"b\\c\nd",backend="cpu"})"), 1);
  EXPECT_EQ(v.at("needle_engine_loaded"), 1);
  EXPECT_EQ(v.at("needle_healthy"), 1);
  EXPECT_EQ(v.at("needle_draining"), 1);
  EXPECT_EQ(v.at("needle_requests_running"), 2);
  EXPECT_EQ(v.at("needle_requests_waiting"), 3);
  EXPECT_EQ(v.at(R"(needle_requests_total{outcome="finished"})"), 7);
  EXPECT_EQ(v.at(R"(needle_requests_total{outcome="cancelled"})"), 1);
  EXPECT_EQ(v.at(R"(needle_requests_total{outcome="failed"})"), 0);
  EXPECT_EQ(v.at(R"(needle_requests_total{outcome="refused"})"), 4);
  EXPECT_EQ(v.at("needle_engine_steps_total"), 99);
  EXPECT_EQ(v.at("needle_prompt_tokens_total"), 1000);
  EXPECT_EQ(v.at("needle_generation_tokens_total"), 50);
  EXPECT_EQ(v.at(R"(needle_kv_cache_pages{pool="selection",state="free"})"), 4);
  EXPECT_EQ(v.at(R"(needle_kv_cache_pages{pool="selection",state="used"})"), 6);
  EXPECT_EQ(v.at(R"(needle_kv_cache_pages{pool="window",state="used"})"), 0);
  EXPECT_DOUBLE_EQ(v.at(R"(needle_kv_cache_usage_ratio{pool="selection"})"), 0.6);
  EXPECT_EQ(text.find("compressed"), std::string::npos) << "a pool the model does not use";

  // 0.003, 0.2 and 100 s, cumulative by hand.
  const std::map<std::string, double> ttft = {{"0.001", 0}, {"0.0025", 0}, {"0.005", 1}, {"0.01", 1},
                                              {"0.1", 1},   {"0.25", 2},   {"60", 2},    {"120", 3},
                                              {"600", 3},   {"+Inf", 3}};
  for (const auto& [le, count] : ttft) {
    EXPECT_EQ(v.at("needle_time_to_first_token_seconds_bucket{le=\"" + le + "\"}"), count) << le;
  }
  EXPECT_EQ(v.at("needle_time_to_first_token_seconds_count"), 3);
  EXPECT_NEAR(v.at("needle_time_to_first_token_seconds_sum"), 100.203, 1e-9);
  for (const char* h : {"needle_queue_time_seconds", "needle_inter_token_latency_seconds",
                        "needle_request_latency_seconds"}) {
    EXPECT_EQ(v.at(std::string(h) + "_bucket{le=\"+Inf\"}"), 0) << h;
    EXPECT_EQ(v.at(std::string(h) + "_count"), 0) << h;
  }
}

TEST(RenderMetrics, BeforeTheEngineLoadsOnlyTheInfo) {
  const std::map<std::string, double> v = ParseExposition(RenderMetrics({"demo", "auto"}, nullptr));
  EXPECT_EQ(v.size(), 2u);
  EXPECT_EQ(v.at(R"(needle_model_info{model="demo",backend="auto"})"), 1);
  EXPECT_EQ(v.at("needle_engine_loaded"), 0);
}

}  // namespace
}  // namespace needle::server
