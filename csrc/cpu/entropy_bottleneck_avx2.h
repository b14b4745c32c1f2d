// SPDX-License-Identifier: Apache-2.0
// The AVX2 + FMA hot loops of the CPU entropy bottleneck (defined in
// entropy_bottleneck_avx2.cpp, compiled for AVX2 whatever the build's flags;
// call them only when available() says the build has them and the CPU runs them).
//
// A span is up to 64 elements whose Philox counters are ctr0 + l. Lane l reads
// its parameter row r at p[r * ps + l] and adds its gradient for row r to
// acc[r * as + l]; ps and as are multiples of 8 and the tiles are padded to a
// multiple of 8 lanes (lanes past count are computed but contribute zero).
#pragma once
#include <cstdint>

#include "cifd/kernels.h"

namespace cifd {
namespace cpu {
namespace eb_avx2 {

// True when this build holds the AVX2 loops and the CPU has AVX2 and FMA.
bool available();

// y_hat (bit-exact: no FMA in the noise path) and keep (0/1) of count elements.
void yhat_span(const EbProblem& pr, uint64_t ctr0, int64_t count, const float* y,
               const float* med, float* yh, float* keep);
// Likelihoods p_b of count elements; returns the sum over kept lanes of -ln p_b.
double fwd_span(int64_t count, float bound, const float* yh, const float* keep, float* lik,
                const float* p, int64_t ps);
// grad_y (float32) of count elements; parameter gradients (and the medians', in
// dequantize mode, row 58) added into acc.
void bwd_span(int mode, int64_t count, float bound, float grate_n, const float* yh,
              const float* keep, const float* gyh, const float* glik, float* gy, const float* p,
              int64_t ps, float* acc, int64_t as);

}  // namespace eb_avx2
}  // namespace cpu
}  // namespace cifd
