// NEEDLE_FUZZ_CHECK: an invariant of a fuzz target. A violation prints the condition and aborts, so
// libFuzzer keeps the input as a crash (and the replay test fails on it).
#pragma once

#include <cstdio>
#include <cstdlib>

#define NEEDLE_FUZZ_CHECK(cond)                                                              \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      std::fprintf(stderr, "%s:%d: fuzz invariant failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                          \
    }                                                                                        \
  } while (0)
