// SPDX-License-Identifier: Apache-2.0
// Portability macros for math shared by the CPU (g++) and CUDA (nvcc) kernels.
#pragma once

#if defined(__CUDACC__)
#define CIFD_HD __host__ __device__ __forceinline__
#else
#define CIFD_HD inline
#endif

// Kernel launches in csrc/cuda/*.cu: CIFD_LAUNCH(kernel, grid, block, smem, stream)(args...)
// is kernel<<<grid, block, smem, stream>>>(args...), spelled so that the C++ tests'
// CPU emulation (csrc/tests/cuda_emu.h, which defines both macros first) can stand
// in for it; `kernel` is one token: a kernel, or a pointer to one. Dynamic shared
// memory likewise: CIFD_DYNAMIC_SHARED(float, name) declares `name`.
#ifndef CIFD_LAUNCH
#define CIFD_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif
#ifndef CIFD_DYNAMIC_SHARED
#define CIFD_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif
