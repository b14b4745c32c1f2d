# SPDX-License-Identifier: Apache-2.0
"""Benchmarks for cifd_kernels, run with ``pytest benchmarks/`` (see README.md).

A package so that ``bench_*.py`` import the harness as ``benchmarks.utils`` and
``python -m benchmarks.plot`` works from the repository root."""
