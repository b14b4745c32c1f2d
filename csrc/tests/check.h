// SPDX-License-Identifier: Apache-2.0
// The C++ unit tests' checks: each failure prints file:line and the condition and
// counts in `failures`, which main() returns as the exit status.
#pragma once
#include <cmath>
#include <cstdio>

static int failures = 0;

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                                    \
    }                                                                                \
  } while (0)

#define CHECK_MSG(cond, ...)                                                         \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                             \
      std::fprintf(stderr, "\n");                                                    \
      ++failures;                                                                    \
    }                                                                                \
  } while (0)

#define CHECK_CLOSE(got, want, rtol, atol)                                                   \
  do {                                                                                       \
    const double g_ = (got), w_ = (want);                                                    \
    if (!(std::fabs(g_ - w_) <= (atol) + (rtol) * std::fabs(w_))) {                          \
      std::fprintf(stderr, "%s:%d: %s = %.9g, want %.9g\n", __FILE__, __LINE__, #got, g_, w_); \
      ++failures;                                                                            \
    }                                                                                        \
  } while (0)
