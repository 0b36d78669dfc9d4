// StopMatcher: scripted feeds, each step's released text and match written out by hand, including
// stop strings split across feeds, overlapping candidates and the earliest-end rule.
#include "engine/stop_matcher.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace needle::engine {
namespace {

struct Step {
  std::string feed;
  std::string released;
  int stop_index = -1;  // -1: no match at this step
};

// Feeds each step in turn and checks its release and match.
void RunScript(StopMatcher& m, const std::vector<Step>& script) {
  for (size_t i = 0; i < script.size(); ++i) {
    const Step& step = script[i];
    StopMatcher::Result r = m.Feed(step.feed);
    EXPECT_EQ(r.text, step.released) << "step " << i << " feed \"" << step.feed << "\"";
    EXPECT_EQ(r.matched, step.stop_index >= 0) << "step " << i;
    EXPECT_EQ(r.stop_index, step.stop_index) << "step " << i;
  }
}

TEST(StopMatcher, OverlappingCandidatesAcrossFeeds) {
  StopMatcher m({"ab", "bc"});
  RunScript(m, {{"x", "x"}, {"a", ""}, {"b", "", 0}});
  EXPECT_TRUE(m.stopped());
}

TEST(StopMatcher, SecondCandidateMatchesAfterTheFirstFails) {
  StopMatcher m({"abc", "bd"});
  // "ab" could start "abc" (and "b" could start "bd"): both bytes held. Then "d": "abd" has no
  // "abc", but "bd" ends here; "a" is released.
  RunScript(m, {{"ab", ""}, {"d", "a", 1}});
}

TEST(StopMatcher, RepeatedPrefixReleasesOnlyWhatCannotMatch) {
  StopMatcher m({"aab"});
  RunScript(m, {{"a", ""}, {"a", ""}, {"a", "a"}, {"b", "", 0}});
}

TEST(StopMatcher, SpansThreeFeeds) {
  StopMatcher m({"<|end|>"});
  RunScript(m, {{"foo<|", "foo"}, {"en", ""}, {"d|>bar", "", 0}});
}

TEST(StopMatcher, MatchInsideOneFeedDropsTheRest) {
  StopMatcher m({"\n\n"});
  StopMatcher::Result r = m.Feed("hi\n\nmore");
  EXPECT_EQ(r.text, "hi");
  EXPECT_TRUE(r.matched);
  EXPECT_EQ(r.stop, "\n\n");
  // Done: nothing more comes out.
  r = m.Feed("x");
  EXPECT_EQ(r.text, "");
  EXPECT_FALSE(r.matched);
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopMatcher, EarliestEndWinsThenEarliestStart) {
  {
    StopMatcher m({"abcd", "bc"});  // "bc" ends at byte 3, "abcd" at 4
    StopMatcher::Result r = m.Feed("abcd");
    EXPECT_EQ(r.text, "a");
    EXPECT_EQ(r.stop, "bc");
    EXPECT_EQ(r.stop_index, 1);
  }
  {
    StopMatcher m({"bc", "abc"});  // both end at byte 3; "abc" starts first
    StopMatcher::Result r = m.Feed("abc");
    EXPECT_EQ(r.text, "");
    EXPECT_EQ(r.stop, "abc");
    EXPECT_EQ(r.stop_index, 1);
  }
  {
    // The same stops fed byte by byte give the same answer.
    StopMatcher m({"abcd", "bc"});
    RunScript(m, {{"a", ""}, {"b", ""}, {"c", "a", 1}});
  }
}

TEST(StopMatcher, NoMatchReleasesAsSoonAsAPrefixBreaks) {
  StopMatcher m({"STOP"});
  RunScript(m, {{"hello S", "hello "}, {"T", ""}, {"x", "STx"}, {"ST", ""}});
  EXPECT_EQ(m.held_bytes(), 2u);
  EXPECT_EQ(m.Flush(), "ST");
  EXPECT_EQ(m.Flush(), "");
  EXPECT_FALSE(m.stopped());
}

TEST(StopMatcher, MultiByteCharacters) {
  StopMatcher m({"\xC3\xA9!"});  // "é!"
  RunScript(m, {{"caf\xC3\xA9", "caf"}, {"?", "\xC3\xA9?"}, {"\xC3\xA9", ""}, {"!", "", 0}});
}

TEST(StopMatcher, NoStopStringsPassEverythingThrough) {
  StopMatcher m({});
  RunScript(m, {{"abc", "abc"}, {"", ""}, {"d", "d"}});
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopMatcher, EmptyStopStringsAreIgnored) {
  StopMatcher m({"", "z"});
  RunScript(m, {{"abc", "abc"}, {"yz", "y", 1}});
}

TEST(StopMatcher, HoldsTheLongestPossiblePrefix) {
  StopMatcher m({"xyz", "yzw"});
  // "axy": "xy" starts "xyz" (2 bytes), "y" starts "yzw"; hold 2.
  RunScript(m, {{"axy", "a"}});
  EXPECT_EQ(m.held_bytes(), 2u);
  // "axyz" ... "xyz" matches.
  RunScript(m, {{"z", "", 0}});
}

}  // namespace
}  // namespace needle::engine
