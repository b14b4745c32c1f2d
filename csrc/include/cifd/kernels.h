// SPDX-License-Identifier: Apache-2.0
// Raw kernel entry points: raw pointers, int64 sizes, no torch. The binding
// layer (python/) checks arguments and calls these.
#pragma once
#include <cstdint>

namespace cifd {
namespace cpu {

// out[i] = uniform(word 0 of philox(seed, offset + i)), i in [0, n).
void philox_uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, int num_threads);
// out[i] = uniform(word 1 of philox(seed, offset + i)) >= rho, as 0/1 bytes.
void philox_keep_mask(uint8_t* out, int64_t n, uint64_t seed, uint64_t offset, float rho,
                      int num_threads);

}  // namespace cpu

namespace cuda {

// Launchers enqueue on `stream` (a cudaStream_t) and return a cudaError_t as int
// (0 = cudaSuccess), so this header stays free of CUDA headers.
int philox_uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, void* stream);
int philox_keep_mask(uint8_t* out, int64_t n, uint64_t seed, uint64_t offset, float rho,
                     void* stream);

}  // namespace cuda
}  // namespace cifd

// ---------------------------------------------------------------- entropy bottleneck
// Fused factorized entropy model (docs/METHOD.md sections 1, 3; math in
// cifd/density.h). y is viewed as [N, C, S] (S = prod(spatial), 1 for [N, C]);
// element i = (n*C + c)*S + s uses Philox counter offset + i.
namespace cifd {

// Element type of y, y_hat, grad_y_hat and grad_y (storage: float, or uint16_t bits).
enum class EbDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct EbProblem {
  int64_t N = 0, C = 0, S = 1;
  int mode = 0;  // 0 noise, 1 dequantize, 2 none
  EbDtype dtype = EbDtype::kFloat32;
  uint64_t seed = 0, offset = 0;
  float rho = 0.0f;    // drop probability (noise mode)
  float s = 1.0f;      // noise scale (noise mode)
  float bound = 1e-9f; // likelihood lower bound
  // Independent problems in one call (CUDA: one launch; CPU: one group after
  // another): y, y_hat, likelihood, grad_y are [G, N, C, S], rate and grad_rate
  // [G, N], packed [58, G C] and grad_packed [59, G C] (group g's channel c is
  // column g C + c), medians [G C]; element i of the whole tensor has counter
  // offset + i, so the bits are those of G calls on the groups' blocks.
  int64_t G = 1;
  // Kernel choices that leave the math contract alone, set by the caller (the
  // Python glue copies cifd_kernels.backend.kernel_options(); csrc reads no
  // environment). cpu_avx2: the CPU kernels take their AVX2 + FMA loops when the
  // CPU has them (false: the baseline float32 loops). cuda_bwd_min_blocks: 1, or 2
  // for the float32 backward compiled for two blocks an SM (an experiment).
  bool cpu_avx2 = true;
  int cuda_bwd_min_blocks = 1;
};

namespace cpu {

// Forward. packed [58, C] (density_pack.py), medians [C] (read in mode 1 only);
// writes y_hat [N*C*S] (dtype), rate [N] (float32 nats over kept elements) and,
// if likelihood is not null, likelihood [N*C*S] float32 (with pr.G groups: the
// [G, ...] shapes of EbProblem::G). Deterministic: the same bits whatever
// num_threads.
void entropy_bottleneck_fwd(const EbProblem& pr, const void* y, const float* packed,
                            const float* medians, void* y_hat, float* rate, float* likelihood,
                            int num_threads);

// Backward. grad_y_hat (dtype, may be null = 0), grad_rate [N] (may be null),
// grad_likelihood [N*C*S] float32 (may be null). Writes grad_y (dtype) and
// grad_packed [59, C] float32 (row 58: medians, mode 1; zero otherwise). The CPU
// result never depends on num_threads (fixed work split, fixed-order sums), so
// `deterministic` changes nothing here.
void entropy_bottleneck_bwd(const EbProblem& pr, const void* y, const float* packed,
                            const float* medians, const void* grad_y_hat, const float* grad_rate,
                            const float* grad_likelihood, void* grad_y, float* grad_packed,
                            bool deterministic, int num_threads);

// Float64 versions (everything float64: y, packed, medians, outputs, gradients),
// with the noise scale s and the bound in float64 (pr.s and pr.bound are not
// read); pr.rho is compared in float32 against the float32 uniform, as the
// reference does. Scalar code with libm's exp/log/tanh: for gradcheck, not speed.
void entropy_bottleneck_fwd(const EbProblem& pr, double s, double bound, const double* y,
                            const double* packed, const double* medians, double* y_hat,
                            double* rate, double* likelihood, int num_threads);
void entropy_bottleneck_bwd(const EbProblem& pr, double s, double bound, const double* y,
                            const double* packed, const double* medians, const double* grad_y_hat,
                            const double* grad_rate, const double* grad_likelihood, double* grad_y,
                            double* grad_packed, int num_threads);

}  // namespace cpu

namespace cuda {

// Float32 workspace elements the launchers below need (0 = none; pass any pointer).
int64_t entropy_bottleneck_fwd_workspace(const EbProblem& pr, int num_sms);
int64_t entropy_bottleneck_bwd_workspace(const EbProblem& pr, bool deterministic, int num_sms);

// Same contracts as the CPU kernels; device pointers, enqueued on `stream`;
// return a cudaError_t as int. The forward is always deterministic (per-block
// partial rates summed in a fixed order); the backward uses float atomics on
// per-block partial sums unless deterministic.
int entropy_bottleneck_fwd(const EbProblem& pr, const void* y, const float* packed,
                           const float* medians, void* y_hat, float* rate, float* likelihood,
                           float* workspace, int num_sms, void* stream);
int entropy_bottleneck_bwd(const EbProblem& pr, const void* y, const float* packed,
                           const float* medians, const void* grad_y_hat, const float* grad_rate,
                           const float* grad_likelihood, void* grad_y, float* grad_packed,
                           bool deterministic, float* workspace, int num_sms, void* stream);

}  // namespace cuda
}  // namespace cifd

// ---------------------------------------------------------------- density pack
// The fused entropy kernels read the density as packed rows [58, C] (row table:
// cifd_kernels/ops/density_pack.py): softplus(H_k), b_k, tanh(a_k). params are the
// kDensityParams CompressAI tensors H0 b0 a0 H1 b1 a1 H2 b2 a2 H3 b3 a3 H4 b4, each
// contiguous [C, widths[i]] (widths sum to 58). Float64 versions for gradcheck.
namespace cifd {

constexpr int kDensityParams = 14;

namespace cpu {

void density_pack(const float* const* params, const int64_t* widths, int64_t C, float* packed);
void density_pack(const double* const* params, const int64_t* widths, int64_t C, double* packed);
// grad_packed [>= 58, C] (rows past 57 are not read) -> grads[i] [C, widths[i]]:
// dH = dW * sigmoid(H) (torch's softplus threshold 20), db = dB, da = dA * (1 - tanh(a)^2).
void density_unpack_grad(const float* grad_packed, const float* const* params,
                         const int64_t* widths, int64_t C, float* const* grads);
void density_unpack_grad(const double* grad_packed, const double* const* params,
                         const int64_t* widths, int64_t C, double* const* grads);

}  // namespace cpu
}  // namespace cifd

// ---------------------------------------------------------------- cifd loss
// Fused stage-2 CIFD loss (docs/METHOD.md section 4; math in cifd/losses.h): per
// sample, CE, the M tau^2-scaled KLs and the M embedding distortions, and the
// gradients of the batch-mean loss with respect to the student's logits and
// embedding, in one pass. Targets are frozen (no gradient); a target whose keep
// flag is 0 is never read.
//
// Groups (the stage-1 losses of an RDM bank in one call): G student sets share
// the targets, labels and lam. Student row r = g B + b (g < G, b < B) is scored
// against target row b and label b; per-row outputs are indexed by r, so ce is
// [G, B] and kl, emb_terms are [M, G, B]; each group's means are over its own B
// rows, and group g's embedding gradient is scaled by group_w[g] (null: 1).
namespace cifd {

struct CifdLossProblem {
  int64_t B = 0, K = 0, D = 0, M = 0;  // D = 0: no embeddings
  int64_t G = 1;                       // student sets (groups) sharing the targets
  EbDtype logits_dtype = EbDtype::kFloat32;  // student and target logits, grad_logits
  EbDtype emb_dtype = EbDtype::kFloat32;     // student and target embeddings, grad_emb
  float tau = 1.0f;
  float lam_ce = 1.0f;  // CE weight (divided by nvalid inside)
  float c_kl = 0.0f;    // lam_kl * tau / B: the KL gradient's scale
  float c_emb = 0.0f;   // w_emb / B: the distortion gradient's scale
  int dist = 0;         // 0 mse, 1 smooth_l1
  int64_t ignore_index = -100;
};

namespace cpu {

// logits [G, B, K], targets [M, B, K], labels [B] int64 (not range-checked: the
// caller's), emb [G, B, D] and target_embs [M, B, D] (null when D = 0), lam [M]
// float32, keep [M] bytes, nvalid: 1 float32 (#non-ignored labels, >= 1),
// group_w [G] float32 or null. Writes ce [G, B], kl [M, G, B], emb_terms
// [M, G, B] (float32; 0 for dropped targets), grad_logits [G, B, K] and grad_emb
// [G, B, D] (the inputs' dtypes). Rows are split across threads; every row's
// result is independent of num_threads and of G.
void cifd_loss_fwd(const CifdLossProblem& pr, const void* logits, const void* targets,
                   const int64_t* labels, const void* emb, const void* target_embs,
                   const float* lam, const uint8_t* keep, const float* nvalid,
                   const float* group_w, float* ce, float* kl, float* emb_terms,
                   void* grad_logits, void* grad_emb, int num_threads);

}  // namespace cpu

namespace cuda {

// Largest M the CUDA kernel takes (its per-target scalars sit in shared memory).
constexpr int64_t kCifdLossMaxTargets = 1024;

// The CPU kernel's contract on device pointers, enqueued on `stream` (a
// cudaStream_t); returns a cudaError_t as int (cudaErrorInvalidValue for M outside
// [1, kCifdLossMaxTargets]). One block per row: no workspace, no atomics, and a
// row's results depend only on that row's inputs and on (K, D), so they are
// bitwise reproducible.
int cifd_loss_fwd(const CifdLossProblem& pr, const void* logits, const void* targets,
                  const int64_t* labels, const void* emb, const void* target_embs,
                  const float* lam, const uint8_t* keep, const float* nvalid,
                  const float* group_w, float* ce, float* kl, float* emb_terms,
                  void* grad_logits, void* grad_emb, void* stream);

}  // namespace cuda
}  // namespace cifd
