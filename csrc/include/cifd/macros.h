// SPDX-License-Identifier: Apache-2.0
// Portability macros for math shared by the CPU (g++) and CUDA (nvcc) kernels.
#pragma once

#if defined(__CUDACC__)
#define CIFD_HD __host__ __device__ __forceinline__
#else
#define CIFD_HD inline
#endif
