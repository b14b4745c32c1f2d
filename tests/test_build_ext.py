# SPDX-License-Identifier: Apache-2.0
"""The built extension cifd_kernels._C keeps its C++ runtime to itself.

On the lent H200 (2026-12-04) the toolchain linked libstdc++ statically into _C and
exported it; that copy mixed with the libstdc++ torch had loaded, and every C++ argument
error that formats an integer crashed the process (a locally forced static link printed
"got " with the number missing). setup.py links with ``--exclude-libs,ALL``."""
import importlib.util
import shutil
import subprocess
import sys

import pytest

_C = importlib.util.find_spec("cifd_kernels._C")
pytestmark = pytest.mark.skipif(_C is None, reason="cifd_kernels._C is not built")

# libstdc++'s own definitions (explicit instantiations and non-template functions): a
# shared-libstdc++ build references them, never defines them.
LIBSTDCXX_OWN = ("_ZNSo9_M_insertIlEERSoT_", "_ZNSt6locale7classicEv", "_ZNSt8ios_base4InitC1Ev",
                 "__cxa_throw")


def test_cpp_errors_format_integers_and_raise():
    """In a fresh process (a crash must not take pytest with it): an argument error
    thrown by the C++ ops, with an integer in its message, reaches Python whole."""
    code = ("import torch, cifd_kernels._C\n"
            "try:\n    torch.ops.cifd_C.philox_uniform_out(torch.empty(4), -7, 0)\n"
            "except RuntimeError as e:\n    print(str(e).splitlines()[0])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip() == "seed must be in [0, 2**63), got -7"


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_no_libstdcxx_symbols_are_exported():
    out = subprocess.run(["nm", "-D", "--defined-only", _C.origin], capture_output=True, text=True,
                         check=True).stdout
    defined = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert not defined & set(LIBSTDCXX_OWN), sorted(defined & set(LIBSTDCXX_OWN))
