# SPDX-License-Identifier: Apache-2.0
"""The package imports and works with neither Triton, nor _C, nor CUDA: everything
falls back to the reference, and `info` says why."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LEAN = textwrap.dedent(r"""
    import sys

    class _Block:
        # make `import triton` and `import cifd_kernels._C` fail as if not installed
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton.") or name == "cifd_kernels._C":
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by test)")
            return None

    sys.meta_path.insert(0, _Block())
    import torch
    import cifd_kernels
    from cifd_kernels import backend
    from cifd_kernels.ops import philox_uniform
    from cifd_kernels.reference import philox as ref

    assert not torch.cuda.is_available()
    assert backend.resolve("philox_uniform", "auto", "cpu") == "reference"
    assert backend.resolve("philox_uniform", "auto", "cuda") == "reference"
    assert torch.equal(philox_uniform((4, 5), 3, 9), ref.philox_uniform((4, 5), 3, 9))
    for name in ("cpu", "triton"):
        try:
            philox_uniform(4, 1, 0, backend=name)
        except backend.BackendUnavailableError as e:
            assert "unavailable" in str(e), e
        else:
            raise AssertionError(f"backend {name} should be unavailable")
    assert "triton" not in sys.modules and "cifd_kernels._C" not in sys.modules
    from cifd_kernels.__main__ import info_text
    text = info_text()
    assert "_C           not loaded" in text and "triton       not available" in text, text
    # without _C the entropy op and the loss have no C++ backend
    assert all(any(l.split()[:3] == [op, "triton,", "reference"] for l in text.splitlines())
               for op in ("entropy_bottleneck", "cifd_loss")), text
    print("LEAN-OK")
""")


def test_lean_import_without_triton_C_or_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    env.pop("CIFD_BACKEND", None)
    r = subprocess.run([sys.executable, "-c", LEAN], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "LEAN-OK" in r.stdout, r.stdout + r.stderr


def test_info_command_runs():
    r = subprocess.run([sys.executable, "-m", "cifd_kernels", "info"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    for needle in ("cifd_kernels", "torch", "backends", "philox_uniform", "calls on cpu / cuda: one op each with C++ autograd",
                   "kernel options (backend.set_kernel_options): eager_via_ops=False"):
        assert needle in r.stdout


@pytest.mark.parametrize("value", ["sometimes"])
def test_bad_backend_env(value):
    env = dict(os.environ, CIFD_BACKEND=value, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", "from cifd_kernels.ops import philox_uniform; philox_uniform(3, 1, 0)"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "CIFD_BACKEND" in r.stderr


def test_disable_switches():
    """CIFD_DISABLE_EXT=1 and CIFD_DISABLE_TRITON=1 (read in backend.py): _C stays unloaded,
    both backends say why they are unavailable, and auto runs the reference."""
    code = textwrap.dedent("""
        import sys
        from cifd_kernels import backend
        print(backend.status("cpu", "cpu")[1]); print(backend.status("triton", "cpu")[1])
        print(backend.resolve("philox_uniform", "auto", "cpu"))
        assert "cifd_kernels._C" not in sys.modules
    """)
    env = dict(os.environ, CIFD_DISABLE_EXT="1", CIFD_DISABLE_TRITON="1", PYTHONPATH=ROOT)
    env.pop("CIFD_BACKEND", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["disabled by CIFD_DISABLE_EXT=1", "disabled by CIFD_DISABLE_TRITON=1",
                                        "reference"], r.stdout
