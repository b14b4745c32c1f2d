# SPDX-License-Identifier: Apache-2.0
"""Fixtures for ``pytest benchmarks/`` and the hook that writes the results file.

* ``bench_device``: ``$CIFD_BENCH_DEVICE``, else the current GPU, else the CPU.
* ``$CIFD_BENCH_THREADS``: ``torch.set_num_threads`` for the session (recorded
  in the results header as ``device_info.torch_threads``).
* ``--kernel-option NAME=VALUE`` (repeatable): a ``backend.KernelOptions`` field
  for the session, e.g. ``--kernel-option triton_bwd_maxnreg=168`` (the GPU
  check's experiments); recorded in the results header as ``kernel_options``.
* ``bench``: a :class:`benchmarks.utils.Bench` around pytest-benchmark's
  ``benchmark`` fixture; its ``run`` records every measurement.
* At the end of the session the records go to
  ``$CIFD_BENCH_OUT/<device-slug>-<UTC timestamp>.json`` (default
  ``benchmarks/results/``), independent of pytest-benchmark's ``--benchmark-json``.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks import utils

_RECORDS = pytest.StashKey[list]()
_DEVICE = pytest.StashKey[object]()
_WRITTEN = pytest.StashKey[object]()


def pytest_addoption(parser):
    parser.addoption("--kernel-option", action="append", default=[], metavar="NAME=VALUE",
                     help=utils.KERNEL_OPTION_HELP)


def pytest_configure(config):
    config.stash[_RECORDS] = []
    utils.apply_kernel_options(config.getoption("--kernel-option"))
    threads = os.environ.get("CIFD_BENCH_THREADS", "").strip()
    if threads:
        # On a busy (shared) machine, intra-op threads that wait for a core they
        # do not get make CPU timings swing 10-40x; one thread keeps them stable.
        torch.set_num_threads(int(threads))


@pytest.fixture(scope="session")
def bench_device(pytestconfig):
    dev = utils.bench_device()
    pytestconfig.stash[_DEVICE] = dev
    return dev


@pytest.fixture
def bench(benchmark, bench_device, request):
    return utils.Bench(benchmark, bench_device, request.config.stash[_RECORDS],
                       name=request.node.name, nodeid=request.node.nodeid)


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    records = config.stash.get(_RECORDS, [])
    if records:  # nothing timed (all skipped, --benchmark-disable): no file
        config.stash[_WRITTEN] = utils.write_results(records, config.stash[_DEVICE])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    path = config.stash.get(_WRITTEN, None)
    if path is not None:
        n = len(config.stash[_RECORDS])
        terminalreporter.write_line(f"cifd_kernels benchmarks: {n} results written to {path}")
