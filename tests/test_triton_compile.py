# SPDX-License-Identifier: Apache-2.0
"""Every Triton kernel compiles for sm_80 and sm_90 on this machine, GPU or not
(tools/triton_aot.py).

The CPU tests run the kernels under TRITON_INTERPRET=1, which never compiles them: on
2026-12-04 the H200 rejected rdm_linear's GELU branch (a plain global float read in a
kernel), which every CPU test had passed. Triton's compiler needs no GPU."""
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ptxas() -> bool:
    """Triton's NVIDIA backend and a ptxas for it (its wheel's own, $TRITON_PTXAS_PATH or
    one on PATH)."""
    spec = importlib.util.find_spec("triton")
    if spec is None or importlib.util.find_spec("triton.backends.nvidia") is None:
        return False
    bundled = pathlib.Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or bool(os.environ.get("TRITON_PTXAS_PATH")) or bool(shutil.which("ptxas"))


@pytest.mark.skipif(not _ptxas(), reason="needs Triton's NVIDIA backend and ptxas")
@pytest.mark.parametrize("arch", [80, 90])  # A100, H100/H200
def test_every_kernel_compiles(arch, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}  # no cached result
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "triton_aot.py"), "--arch", str(arch),
                        "--jobs", str(min(4, os.cpu_count() or 1))],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "0 failed" in r.stdout and " launches to compile" in r.stdout
