// SPDX-License-Identifier: Apache-2.0
// CompressAI-layout density parameters <-> the packed [58, C] rows every fused
// entropy kernel reads (row table: cifd_kernels/ops/density_pack.py). Tiny
// (58 * C values), but done here in one call instead of ~20 autograd-tracked
// torch ops forward and ~40 backward, which cost more than the kernel itself
// at the IBM's sizes.
#include <cmath>

#include "cifd/kernels.h"

namespace cifd {
namespace cpu {

namespace {

// torch.nn.functional.softplus with beta = 1, threshold = 20, and its gradient
// factor d softplus(h) / dh = sigmoid(h) (1 above the threshold, as torch).
template <typename T>
inline T softplus(T h) { return h > T(20) ? h : std::log1p(std::exp(h)); }
template <typename T>
inline T softplus_grad(T h) {
  if (h > T(20)) return T(1);
  const T z = std::exp(h);
  return z / (z + T(1));
}

// Param i of H0 b0 a0 H1 b1 a1 H2 b2 a2 H3 b3 a3 H4 b4: 0 matrix, 1 bias, 2 factor.
inline int kind(int i) { return i % 3; }

template <typename T>
void pack(const T* const* params, const int64_t* widths, int64_t C, T* packed) {
  int64_t row = 0;
  for (int i = 0; i < kDensityParams; ++i) {
    const int64_t n = widths[i];
    const T* p = params[i];
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t j = 0; j < n; ++j) {
        const T v = p[c * n + j];
        packed[(row + j) * C + c] = kind(i) == 0 ? softplus(v) : kind(i) == 2 ? std::tanh(v) : v;
      }
    }
    row += n;
  }
}

template <typename T>
void unpack_grad(const T* grad_packed, const T* const* params, const int64_t* widths, int64_t C,
                 T* const* grads) {
  int64_t row = 0;
  for (int i = 0; i < kDensityParams; ++i) {
    const int64_t n = widths[i];
    const T* p = params[i];
    T* g = grads[i];
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t j = 0; j < n; ++j) {
        const T v = p[c * n + j];
        const T gp = grad_packed[(row + j) * C + c];
        T f = T(1);
        if (kind(i) == 0) {
          f = softplus_grad(v);
        } else if (kind(i) == 2) {
          const T t = std::tanh(v);
          f = T(1) - t * t;
        }
        g[c * n + j] = gp * f;
      }
    }
    row += n;
  }
}

}  // namespace

void density_pack(const float* const* params, const int64_t* widths, int64_t C, float* packed) {
  pack(params, widths, C, packed);
}
void density_pack(const double* const* params, const int64_t* widths, int64_t C, double* packed) {
  pack(params, widths, C, packed);
}
void density_unpack_grad(const float* grad_packed, const float* const* params,
                         const int64_t* widths, int64_t C, float* const* grads) {
  unpack_grad(grad_packed, params, widths, C, grads);
}
void density_unpack_grad(const double* grad_packed, const double* const* params,
                         const int64_t* widths, int64_t C, double* const* grads) {
  unpack_grad(grad_packed, params, widths, C, grads);
}

}  // namespace cpu
}  // namespace cifd
