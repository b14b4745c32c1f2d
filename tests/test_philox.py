# SPDX-License-Identifier: Apache-2.0
"""cifd::philox_uniform / philox_keep_mask: bit-identity across reference, C++ CPU,
Triton (interpreter on CPU, compiled on GPU) and CUDA; the contract's details;
opcheck; torch.compile; errors."""
import pytest
import torch

from cifd_kernels import BackendUnavailableError, backend
from cifd_kernels.ops import philox_keep_mask, philox_uniform
from cifd_kernels.reference import philox as ref
from helpers import backend_or_skip

KERNEL_BACKENDS = ["cpu", "triton", "cuda"]
# (seed, offset): zero; small; offsets crossing the 2**32 counter carry; seeds using the high key word.
CASES = [(0, 0), (123, 5), (2**40 + 7, 2**32 - 300), (2**63 - 1, 2**62), (0xDEADBEEF, 2**33 + 1)]


def _backend_device_ok(be, device):
    if be == "cuda" and device == "cpu":
        pytest.skip("CUDA kernels take CUDA tensors")
    if be == "cpu" and device == "cuda":
        pytest.skip("C++ CPU kernels take CPU tensors")
    backend_or_skip(be, device)


def test_reference_known_answer():
    # Random123 KAT: philox4x32-10 of counter 0, key 0 starts with 0x6627e8d5.
    w0, w1, w2, w3 = ref.philox_words(1, seed=0, offset=0)
    assert [int(w0), int(w1), int(w2), int(w3)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # uniform of 0x6627e8d5: positive int32 -> value * scale, in float32
    expected = torch.tensor(float(0x6627E8D5), dtype=torch.float32) * torch.tensor(
        ref.UNIFORM_SCALE, dtype=torch.float32)
    assert ref.philox_uniform(1, 0, 0).item() == expected.item()


def test_reference_uniform_mapping_edges():
    words = torch.tensor([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF], dtype=torch.int64)
    u = ref.uint_to_uniform(words)
    assert u[0] == 0 and u[4] == 0  # 0 and ~(-1)
    assert u[2] == u[3] and u[2] < 1.0  # INT32_MAX and ~INT32_MIN
    assert u.dtype == torch.float32 and (u >= 0).all()


@pytest.mark.parametrize("be", KERNEL_BACKENDS)
@pytest.mark.parametrize("seed,offset", CASES)
@pytest.mark.parametrize("shape", [(1,), (7, 193), (4097,), (3, 5, 11)])
def test_uniform_bits_match_reference(be, seed, offset, shape, device):
    _backend_device_ok(be, device)
    want = ref.philox_uniform(shape, seed, offset)
    got = philox_uniform(shape, seed, offset, device=device, backend=be)
    assert got.shape == torch.Size(shape) and got.dtype == torch.float32 and got.device.type == device
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("be", KERNEL_BACKENDS)
@pytest.mark.parametrize("seed,offset", CASES[:3])
@pytest.mark.parametrize("rho", [0.0, 0.25, 0.9, 1.0])
def test_keep_mask_bits_match_reference(be, seed, offset, rho, device):
    _backend_device_ok(be, device)
    shape = (31, 129)
    want = ref.philox_keep_mask(shape, seed, offset, rho)
    got = philox_keep_mask(shape, seed, offset, rho, device=device, backend=be)
    assert got.dtype == torch.bool and torch.equal(got.cpu(), want)
    if rho == 0.0:
        assert want.all()
    if rho == 1.0:
        assert not want.any()  # uniforms are < 1


def test_mask_and_noise_share_the_counter():
    # word 0 -> noise, word 1 -> mask of the same counter (docs/METHOD.md section 5)
    w0, w1, _, _ = ref.philox_words(1000, 9, 77)
    assert torch.equal(ref.philox_uniform(1000, 9, 77), ref.uint_to_uniform(w0))
    assert torch.equal(ref.philox_keep_mask(1000, 9, 77, 0.3), ref.uint_to_uniform(w1) >= 0.3)
    assert torch.equal(ref.philox_noise(1000, 9, 77), ref.uint_to_uniform(w0) - 0.5)


def test_offsets_compose():
    # element i of a draw at offset o equals element 0 of a draw at offset o + i
    a = ref.philox_uniform(64, 5, 1000)
    b = ref.philox_uniform(32, 5, 1032)
    assert torch.equal(a[32:], b)


@pytest.mark.parametrize("be", ["reference", "cpu", "triton"])
def test_statistics(be):
    backend_or_skip(be, "cpu")
    u = philox_uniform(200_000, 31337, 0, backend=be).double()
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert u.min() >= 0 and u.max() < 1
    keep = philox_keep_mask(200_000, 31337, 0, 0.25, backend=be).double()
    assert abs(keep.mean().item() - 0.75) < 0.005


@pytest.mark.parametrize("be", ["reference", "cpu", "triton", "cuda"])
def test_deterministic(be, device):
    _backend_device_ok(be, device)
    a = philox_uniform((1000,), 42, 7, device=device, backend=be)
    b = philox_uniform((1000,), 42, 7, device=device, backend=be)
    c = philox_uniform((1000,), 43, 7, device=device, backend=be)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2**22 + 3])
def test_cuda_equals_triton_large(n):
    backend_or_skip("cuda", "cuda")
    backend_or_skip("triton", "cuda")
    for seed, offset in CASES:
        a = philox_uniform(n, seed, offset, device="cuda", backend="cuda")
        b = philox_uniform(n, seed, offset, device="cuda", backend="triton")
        assert torch.equal(a, b)
        ma = philox_keep_mask(n, seed, offset, 0.25, device="cuda", backend="cuda")
        mb = philox_keep_mask(n, seed, offset, 0.25, device="cuda", backend="triton")
        assert torch.equal(ma, mb)
    # and against the reference run on the GPU
    assert torch.equal(a, philox_uniform(n, seed, offset, device="cuda", backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_rounded_float32(dtype):
    u = philox_uniform((100,), 1, 2, dtype=dtype, backend="reference")
    assert u.dtype == dtype
    assert torch.equal(u, ref.philox_uniform((100,), 1, 2).to(dtype))


@pytest.mark.parametrize("be", ["reference", "cpu", "triton"])
def test_empty(be):
    backend_or_skip(be, "cpu")
    assert philox_uniform((0, 5), 1, 2, backend=be).shape == (0, 5)
    assert philox_keep_mask((5, 0), 1, 2, 0.5, backend=be).shape == (5, 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        philox_uniform(4, -1, 0)
    with pytest.raises(ValueError, match="seed"):
        philox_uniform(4, 2**63, 0)
    with pytest.raises(TypeError, match="seed"):
        philox_uniform(4, 1.5, 0)
    with pytest.raises(TypeError, match="offset"):
        philox_uniform(4, 1, torch.tensor(3))
    with pytest.raises(ValueError, match="offset"):
        philox_uniform(4, 1, 2**63 - 2)  # offset + numel overflows the counter
    with pytest.raises(ValueError, match="shape"):
        philox_uniform((-1, 3), 1, 0)
    for bad in ((2.5,), 2.0, "ab", (True,), [1, None]):  # not truncated, not int()'d
        for fn, rest in ((philox_uniform, ()), (philox_keep_mask, (0.5,))):
            with pytest.raises(TypeError, match=r"^shape must be an int or a sequence of ints, got "):
                fn(bad, 1, 0, *rest)
    import numpy as np
    assert philox_uniform((np.int64(2), 3), 1).shape == (2, 3) == philox_uniform(torch.Size([2, 3]), 1).shape
    with pytest.raises(ValueError, match="rho"):
        philox_keep_mask(4, 1, 0, 1.5)
    with pytest.raises(TypeError, match="dtype"):
        philox_uniform(4, 1, 0, dtype=torch.int32)
    with pytest.raises(ValueError, match="backend"):
        philox_uniform(4, 1, 0, backend="fast")


def test_unavailable_backend_names_the_reason(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="philox_uniform.*cuda"):
        philox_uniform(4, 1, 0, device="cpu", backend="cuda")
    monkeypatch.setenv("CIFD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="CIFD_BACKEND"):
        philox_uniform(4, 1, 0)


def test_raw_kernel_checks():
    backend_or_skip("cpu", "cpu")
    import cifd_kernels._C  # noqa: F401
    with pytest.raises(RuntimeError, match="out must be Float"):
        torch.ops.cifd_C.philox_uniform_out(torch.empty(4, dtype=torch.float64), 1, 0)
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        torch.ops.cifd_C.philox_uniform_out(torch.empty(4, 4).t(), 1, 0)
    with pytest.raises(RuntimeError, match="seed"):
        torch.ops.cifd_C.philox_uniform_out(torch.empty(4), -3, 0)
    with pytest.raises(RuntimeError, match="rho"):
        torch.ops.cifd_C.philox_keep_mask_out(torch.empty(4, dtype=torch.bool), 1, 0, 2.0)


@pytest.mark.parametrize("be", ["reference", "cpu"])
def test_opcheck(be):
    backend_or_skip(be, "cpu")
    from torch.library import opcheck
    opcheck(torch.ops.cifd.philox_uniform.default, ([3, 5], 11, 13, torch.device("cpu"), be))
    opcheck(torch.ops.cifd.philox_keep_mask.default, ([3, 5], 11, 13, 0.3, torch.device("cpu"), be))
    if be == "cpu":
        out = torch.empty(17)
        opcheck(torch.ops.cifd_C.philox_uniform_out.default, (out, 11, 13))
        mask = torch.empty(17, dtype=torch.bool)
        opcheck(torch.ops.cifd_C.philox_keep_mask_out.default, (mask, 11, 13, 0.3))


@pytest.mark.gpu
@pytest.mark.parametrize("be", ["cuda", "triton"])
def test_opcheck_gpu(be):
    backend_or_skip(be, "cuda")
    from torch.library import opcheck
    opcheck(torch.ops.cifd.philox_uniform.default, ([3, 5], 11, 13, torch.device("cuda"), be))
    opcheck(torch.ops.cifd.philox_keep_mask.default, ([3, 5], 11, 13, 0.3, torch.device("cuda"), be))


def test_compile_equals_eager():
    be = "cpu" if backend.status("cpu", "cpu")[0] else "reference"

    def f(x, seed: int, offset: int):
        return x + philox_uniform(x.shape, seed, offset, backend=be) * philox_keep_mask(
            x.shape, seed, offset, 0.5, backend=be)

    x = torch.randn(8, 33)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for seed in (1, 2):
        assert torch.equal(cf(x, seed, 3), f(x, seed, 3))
