# SPDX-License-Identifier: Apache-2.0
"""Triton kernels and their launchers. Imported lazily by :mod:`cifd_kernels.ops`,
so the package imports without Triton."""
