// SPDX-License-Identifier: Apache-2.0
// A random packed density [58, C] for the C++ tests (rows as density_pack writes them:
// softplus'd matrices positive, tanh'd factors in (-1, 1), biases anywhere).
#pragma once
#include <cstdint>
#include <random>
#include <vector>

#include "cifd/density.h"

inline std::vector<float> random_packed(int64_t C, std::mt19937& g) {
  namespace d = cifd::density;
  std::normal_distribution<float> nb(0.0f, 0.5f);
  std::uniform_real_distribution<float> w(0.2f, 1.5f), a(-0.9f, 0.9f);
  std::vector<float> p(static_cast<size_t>(d::kNumPacked) * C);
  auto row = [&](int r, auto& dist) {
    for (int64_t c = 0; c < C; ++c) p[r * C + c] = dist(g);
  };
  for (int r = 0; r < d::kNumPacked; ++r) row(r, nb);  // biases
  for (int j = 0; j < 3; ++j) {
    row(d::kW0 + j, w);
    row(d::kA0 + j, a);
    row(d::kW4 + j, w);
  }
  const int hw[3] = {d::Hidden<1>::W, d::Hidden<2>::W, d::Hidden<3>::W};
  const int ha[3] = {d::Hidden<1>::A, d::Hidden<2>::A, d::Hidden<3>::A};
  for (int k = 0; k < 3; ++k) {
    for (int i = 0; i < 9; ++i) row(hw[k] + i, w);
    for (int j = 0; j < 3; ++j) row(ha[k] + j, a);
  }
  return p;
}
