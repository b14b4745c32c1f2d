# SPDX-License-Identifier: Apache-2.0
"""The raw compiled entropy-bottleneck kernels (cifd_C::entropy_bottleneck_fwd/bwd, C++
CPU and CUDA) against the eager reference: y_hat (so noise and masks) bit for bit,
rates, likelihoods and every gradient within float32 tolerance, float16/bfloat16 by
the flash-attention rule, determinism, and argument errors."""
import pytest
import torch

from helpers import backend_or_skip
from cifd_kernels.backend import kernel_options
from cifd_kernels.ops.density_pack import MODES, NUM_GRAD, NUM_PACKED, pack_density, unpack_density_grad
from cifd_kernels.reference import entropy_bottleneck as R
from cifd_kernels.reference.ibm import ibm

BOUND = 1e-9


def _ops():
    import cifd_kernels._C  # noqa: F401  (registers cifd_C::)
    return torch.ops.cifd_C


def _params(C, seed=0, device="cpu"):
    """CompressAI-initialised parameters, perturbed so every factor and bias matters."""
    g = torch.Generator().manual_seed(seed)
    P = R.init_params(C, generator=g)
    def pert(ts, scale):
        return [(t + scale * torch.randn(t.shape, generator=g)).to(device).requires_grad_() for t in ts]
    mats = pert(P["matrices"], 0.4)
    biases = pert(P["biases"], 0.5)
    factors = pert(P["factors"], 0.6)
    medians = (0.3 * torch.randn(C, generator=g)).to(device).requires_grad_()
    return mats, biases, factors, medians


def _reference(y, mats, biases, factors, medians, mode, seed, offset, rho, s):
    """(y_hat, rate, likelihood) of the eager reference, differentiable in everything."""
    if mode == "noise":
        yh, rate, _ = ibm(y, mats, biases, factors, rho=rho, s=s, seed=seed, offset=offset, bound=BOUND)
        cdt = torch.float32
        # likelihood at the float32 y_hat (what the fused kernel stores), dropped elements at 0
        yh32 = yh if yh.dtype == cdt else ibm(y.to(cdt), mats, biases, factors, rho=rho, s=s, seed=seed,
                                              offset=offset, bound=BOUND)[0]
        lik = R.likelihood(yh32 / s, mats, biases, factors, bound=BOUND)  # read at y_hat / s
        return yh, rate, lik
    yh, lik = R.entropy_bottleneck(y, mats, biases, factors, medians, mode=mode, seed=seed, offset=offset,
                                   bound=BOUND)
    return yh, R.rate_nats(lik), lik


def _kernel(y, mats, biases, factors, medians, mode, seed, offset, rho, s, gyh, grate, glik, det=True):
    ops = _ops()
    packed = pack_density(mats, biases, factors)
    med = medians.detach().float().contiguous() if mode == "dequantize" else torch.empty(0, device=y.device)
    m = MODES[mode]
    yh, rate, lik = ops.entropy_bottleneck_fwd(y.detach(), packed, med, m, seed, offset, rho, s, BOUND, True)
    gy, gp = ops.entropy_bottleneck_bwd(y.detach(), packed, med, gyh, grate, glik, m, seed, offset, rho, s,
                                        BOUND, det)
    gm, gb, gf = unpack_density_grad(gp, mats, biases, factors)
    return yh, rate, lik, gy, gm + gb + gf, gp[NUM_PACKED]


def _close(a, b, rtol=2e-4, atol_rel=2e-5):
    """float32 comparison with an absolute floor scaled to the reference's magnitude (the
    kernels fuse multiply-adds and sum in another order than torch)."""
    b = b.to(a.dtype)
    atol = atol_rel * (1.0 + float(b.abs().max())) if b.numel() else atol_rel
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _compare(shape, mode, rho, s, device="cpu", seed=1234, offset=77, pseed=0, det=True):
    C = shape[1]
    mats, biases, factors, medians = _params(C, pseed, device)
    g = torch.Generator().manual_seed(pseed + 1)
    y = (3.0 * torch.randn(shape, generator=g)).to(device).requires_grad_()
    yh, rate, lik = _reference(y, mats, biases, factors, medians, mode, seed, offset, rho, s)
    gyh = torch.randn(shape, generator=g).to(device)
    grate = torch.randn(shape[0], generator=g).to(device)
    glik = torch.randn(shape, generator=g).to(device)
    loss = (yh * gyh).sum() + (rate * grate).sum() + (lik * glik).sum()
    leaves = mats + biases + factors + [y, medians]
    ref_grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    ref_grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, ref_grads)]

    kyh, krate, klik, kgy, kgp, kgmed = _kernel(y, mats, biases, factors, medians, mode, seed, offset, rho, s,
                                                gyh, grate, glik, det)
    assert kyh.dtype == y.dtype and kyh.shape == y.shape
    assert torch.equal(kyh, yh.detach()), "y_hat must match the reference bit for bit"
    _close(krate, rate.detach())
    _close(klik, lik.detach())
    # Parameter gradients sum over all N*S elements of a channel: the float32
    # reference's own summation error reaches ~7e-5 of the largest entry at
    # (4097, 193) (against a float64 run: test_gradients_against_float64), hence
    # the looser floor.
    for k, (got, want) in enumerate(zip(kgp, ref_grads[:-2])):
        _close(got, want, rtol=1e-3, atol_rel=2e-4)
    _close(kgy, ref_grads[-2])
    if mode == "dequantize":
        _close(kgmed, ref_grads[-1], rtol=1e-3, atol_rel=2e-4)
    else:
        assert torch.count_nonzero(kgmed) == 0


SMALL = [(1, 1), (7, 3), (2, 5, 3, 4)]


@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("rho", [0.0, 0.25, 0.9])
@pytest.mark.parametrize("s", [1.0, 0.5])
def test_noise_matches_reference(shape, rho, s):
    backend_or_skip("cpu", "cpu")
    _compare(shape, "noise", rho, s)


@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("mode", ["dequantize", "none"])
def test_eval_modes_match_reference(shape, mode):
    backend_or_skip("cpu", "cpu")
    _compare(shape, mode, 0.0, 1.0)


@pytest.mark.parametrize("mode,rho,s", [("noise", 0.25, 0.5), ("noise", 0.0, 1.0), ("dequantize", 0.0, 1.0),
                                        ("none", 0.0, 1.0)])
def test_large_matches_reference(mode, rho, s):
    backend_or_skip("cpu", "cpu")
    _compare((4097, 193), mode, rho, s, offset=(1 << 32) - 5000)  # crosses the counter's low word


@pytest.mark.parametrize("C", [8, 16, 24, 32, 40, 56, 100])
def test_channel_counts_split_into_smaller_blocks(C):
    """The AVX2 span runs blocks of 8 vectors, then 4, 2 and single ones for the
    tail (C = 32 is one 4-vector block): every split against the reference."""
    backend_or_skip("cpu", "cpu")
    _compare((9, C), "noise", 0.25, 0.5)


@pytest.mark.parametrize("shape", [(7, 3), (9, 40), (2, 5, 3, 4), (1100, 67)])
@pytest.mark.parametrize("mode,rho,s", [("noise", 0.25, 0.5), ("noise", 0.0, 1.0), ("dequantize", 0.0, 1.0),
                                        ("none", 0.0, 1.0)])
def test_baseline_loops_match_reference(shape, mode, rho, s):
    """The baseline float32 loops (what a CPU without AVX2 + FMA runs), forced on any CPU
    with the cpu_avx2 kernel option: the reference's y_hat bit for bit, the rest within
    the same float32 bounds as the AVX2 loops."""
    backend_or_skip("cpu", "cpu")
    with kernel_options(cpu_avx2=False):
        _compare(shape, mode, rho, s, offset=(1 << 32) - 50)


def test_avx2_option_reaches_the_kernel():
    """On a CPU with AVX2 + FMA the two loop sets round differently somewhere in a
    [1100, 67] fwd+bwd (fused multiply-adds against separate ones): so cpu_avx2=False
    did switch the kernel (y_hat stays bit-exact either way)."""
    backend_or_skip("cpu", "cpu")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU (as torch sees it) runs the baseline loops either way")
    mats, biases, factors, medians = _params(67, 3)
    g = torch.Generator().manual_seed(5)
    y = 3.0 * torch.randn(1100, 67, generator=g)
    gyh, grate = torch.randn(1100, 67, generator=g), torch.randn(1100, generator=g)

    def run():
        return _kernel(y, mats, biases, factors, medians, "noise", 5, 7, 0.25, 0.5, gyh, grate,
                       torch.empty(0))[:5]
    fast = run()
    with kernel_options(cpu_avx2=False):
        base = run()
    assert torch.equal(fast[0], base[0])
    assert not all(torch.equal(a, b) for a, b in zip(fast[1:4], base[1:4]))


def test_gradients_against_float64():
    """At (2049, 193) the kernels' gradients are as close to a float64 run of the reference
    as the float32 reference is (at most 2x its error plus 2e-5 of the largest entry;
    noise mode, where float64 draws the same u)."""
    backend_or_skip("cpu", "cpu")
    shape, mode, rho, s, seed, offset = (2049, 193), "noise", 0.25, 0.5, 7, 0
    mats, biases, factors, medians = _params(193, 0)
    g = torch.Generator().manual_seed(1)
    y = 3.0 * torch.randn(shape, generator=g)
    gyh, grate, glik = torch.randn(shape, generator=g), torch.randn(shape[0], generator=g), torch.randn(shape, generator=g)

    def ref(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in mats + biases + factors + [y]]
        yh, rate, lik = _reference(leaves[14], leaves[:5], leaves[5:10], leaves[10:14], None, mode, seed, offset,
                                   rho, s)
        loss = (yh * gyh.to(dt)).sum() + (rate * grate.to(dt)).sum() + (lik * glik.to(dt)).sum()
        return torch.autograd.grad(loss, leaves)

    r32, r64 = ref(torch.float32), ref(torch.float64)
    k = _kernel(y, mats, biases, factors, medians, mode, seed, offset, rho, s, gyh, grate, glik)
    for got, lo, want in zip(k[4] + [k[3]], r32, r64):
        err_k = (got.double() - want).abs().max().item()
        err_r = (lo.double() - want).abs().max().item()
        assert err_k <= 2 * err_r + 2e-5 * (1 + want.abs().max().item()), (err_k, err_r)


def test_spatial_multiple_channels_per_tile():
    backend_or_skip("cpu", "cpu")
    _compare((3, 70, 5, 1), "noise", 0.25, 0.5)  # S > 1 with C above one tile
    _compare((2, 3, 130), "dequantize", 0.0, 1.0)  # S spans several lane blocks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["noise", "dequantize"])
def test_half_dtypes_flash_attention_rule(dtype, mode):
    """Kernel in dtype vs float32 reference: error at most 2x the reference's own error
    in that dtype, plus a small floor."""
    backend_or_skip("cpu", "cpu")
    shape, C = (33, 6, 5), 6
    mats, biases, factors, medians = _params(C, 3)
    g = torch.Generator().manual_seed(9)
    y32 = (3.0 * torch.randn(shape, generator=g)).to(dtype).float()  # representable in dtype
    gyh = torch.randn(shape, generator=g)
    grate, glik = torch.randn(shape[0], generator=g), torch.randn(shape, generator=g)
    rho, s = (0.25, 0.5) if mode == "noise" else (0.0, 1.0)

    def ref(y):
        y = y.detach().requires_grad_()
        yh, rate, lik = _reference(y, mats, biases, factors, medians, mode, 5, 0, rho, s)
        loss = (yh.float() * gyh).sum() + (rate * grate).sum() + (lik * glik).sum()
        gy = torch.autograd.grad(loss, [y])[0]
        return yh, rate, lik, gy

    r32 = ref(y32)
    rlo = ref(y32.to(dtype))
    k = _kernel(y32.to(dtype), mats, biases, factors, medians, mode, 5, 0, rho, s, gyh.to(dtype), grate, glik)
    assert k[0].dtype == dtype and k[3].dtype == dtype
    for got, lo, want in zip((k[0], k[1], k[2], k[3]), rlo, r32):
        want = want.detach().float()
        err_k = (got.float() - want).abs().max().item()
        err_r = (lo.detach().float() - want).abs().max().item()
        assert err_k <= 2 * err_r + 1e-4 * (1 + want.abs().max().item()), (err_k, err_r)


def test_large_inputs_stay_finite():
    backend_or_skip("cpu", "cpu")
    ops = _ops()
    mats, biases, factors, medians = _params(4, 2)
    packed = pack_density(mats, biases, factors)
    y = torch.randn(64, 4, 3) * 1e4
    y[0, 0, 0], y[1, 1, 1] = 1e4, -1e4
    for mode in (0, 1, 2):
        med = medians.detach() if mode == 1 else torch.empty(0)
        yh, rate, lik = ops.entropy_bottleneck_fwd(y, packed, med, mode, 3, 0, 0.0, 1.0, BOUND, True)
        gy, gp = ops.entropy_bottleneck_bwd(y, packed, med, torch.randn_like(y), torch.randn(64),
                                            torch.randn_like(y), mode, 3, 0, 0.0, 1.0, BOUND, True)
        for t in (yh, rate, lik, gy, gp):
            assert torch.isfinite(t).all()
        assert (lik >= BOUND).all()


def test_deterministic_and_thread_independent():
    backend_or_skip("cpu", "cpu")
    ops = _ops()
    mats, biases, factors, _ = _params(67, 4)
    packed = pack_density(mats, biases, factors)
    g = torch.Generator().manual_seed(0)
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            for shape in ((1000, 67), (9, 67, 40)):
                y = 2 * torch.randn(shape, generator=torch.Generator().manual_seed(1))
                gyh = torch.randn(shape, generator=torch.Generator().manual_seed(2))
                grate = torch.randn(shape[0], generator=torch.Generator().manual_seed(3))
                f = ops.entropy_bottleneck_fwd(y, packed, torch.empty(0), 0, 11, 5, 0.25, 1.0, BOUND, True)
                b = ops.entropy_bottleneck_bwd(y, packed, torch.empty(0), gyh, grate, torch.empty(0), 0, 11, 5,
                                               0.25, 1.0, BOUND, True)
                outs.append(list(f) + list(b))
    finally:
        torch.set_num_threads(old)
    del g
    n = len(outs) // 3
    for run in (1, 2):
        for a, b in zip(outs[:n], outs[run * n:(run + 1) * n]):
            for x, z in zip(a, b):
                assert torch.equal(x, z)


def test_empty_inputs():
    backend_or_skip("cpu", "cpu")
    ops = _ops()
    mats, biases, factors, _ = _params(3, 0)
    packed = pack_density(mats, biases, factors)
    y = torch.empty(0, 3)
    yh, rate, lik = ops.entropy_bottleneck_fwd(y, packed, torch.empty(0), 0, 1, 0, 0.0, 1.0, BOUND, True)
    assert yh.shape == (0, 3) and rate.shape == (0,) and lik.shape == (0, 3)
    gy, gp = ops.entropy_bottleneck_bwd(y, packed, torch.empty(0), torch.empty(0), torch.empty(0),
                                        torch.empty(0), 0, 1, 0, 0.0, 1.0, BOUND, True)
    assert gy.shape == (0, 3) and gp.shape == (NUM_GRAD, 3) and torch.count_nonzero(gp) == 0
    y = torch.empty(4, 3, 0)
    _, rate, _ = ops.entropy_bottleneck_fwd(y, packed, torch.empty(0), 0, 1, 0, 0.0, 1.0, BOUND, False)
    assert torch.equal(rate, torch.zeros(4))


def test_absent_gradients_are_zero():
    backend_or_skip("cpu", "cpu")
    ops = _ops()
    mats, biases, factors, _ = _params(5, 1)
    packed = pack_density(mats, biases, factors)
    y = torch.randn(20, 5)
    e = torch.empty(0)
    gyh = torch.randn(20, 5)
    a = ops.entropy_bottleneck_bwd(y, packed, e, gyh, e, e, 0, 1, 0, 0.0, 1.0, BOUND, True)
    b = ops.entropy_bottleneck_bwd(y, packed, e, gyh, torch.zeros(20), torch.zeros(20, 5), 0, 1, 0, 0.0, 1.0,
                                   BOUND, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.count_nonzero(a[1]) == 0  # no density gradient without rate/likelihood gradients


def test_bad_arguments_name_themselves():
    backend_or_skip("cpu", "cpu")
    ops = _ops()
    mats, biases, factors, medians = _params(4, 0)
    packed = pack_density(mats, biases, factors)
    y = torch.randn(6, 4)
    e = torch.empty(0)
    fwd = ops.entropy_bottleneck_fwd
    bwd = ops.entropy_bottleneck_bwd
    with pytest.raises(RuntimeError, match=r"packed must be float64 \(the compute dtype of Double y\)"):
        fwd(y.double(), packed, e, 0, 1, 0, 0.0, 1.0, BOUND, False)
    with pytest.raises(RuntimeError, match="y must be float32"):
        fwd(y.int(), packed, e, 0, 1, 0, 0.0, 1.0, BOUND, False)
    with pytest.raises(RuntimeError, match="y must be contiguous"):
        fwd(torch.randn(4, 6).t(), packed, e, 0, 1, 0, 0.0, 1.0, BOUND, False)
    with pytest.raises(RuntimeError, match=r"packed must be \[58, 4\]"):
        fwd(y, packed[:57], e, 0, 1, 0, 0.0, 1.0, BOUND, False)
    with pytest.raises(RuntimeError, match="packed must be float32"):
        fwd(y, packed.double(), e, 0, 1, 0, 0.0, 1.0, BOUND, False)
    with pytest.raises(RuntimeError, match=r"medians must be \[4\]"):
        fwd(y, packed, torch.zeros(3), 1, 1, 0, 0.0, 1.0, BOUND, False)
    with pytest.raises(RuntimeError, match="seed must be"):
        fwd(y, packed, e, 0, -1, 0, 0.0, 1.0, BOUND, False)
    with pytest.raises(RuntimeError, match="offset must be"):
        fwd(y, packed, e, 0, 1, -2, 0.0, 1.0, BOUND, False)
    with pytest.raises(RuntimeError, match="mode must be"):
        fwd(y, packed, e, 3, 1, 0, 0.0, 1.0, BOUND, False)
    with pytest.raises(RuntimeError, match="rho must be"):
        fwd(y, packed, e, 0, 1, 0, 1.5, 1.0, BOUND, False)
    with pytest.raises(RuntimeError, match="grad_y_hat must have shape"):
        bwd(y, packed, e, torch.randn(6, 3), e, e, 0, 1, 0, 0.0, 1.0, BOUND, True)
    with pytest.raises(RuntimeError, match="grad_y_hat must be Float"):
        bwd(y, packed, e, torch.randn(6, 4).double(), e, e, 0, 1, 0, 0.0, 1.0, BOUND, True)
    with pytest.raises(RuntimeError, match="grad_rate must be Double"):
        bwd(y.double(), packed.double(), e, e, torch.randn(6), e, 0, 1, 0, 0.0, 1.0, BOUND, True)
    with pytest.raises(RuntimeError, match="grad_rate must have shape"):
        bwd(y, packed, e, e, torch.randn(5), e, 0, 1, 0, 0.0, 1.0, BOUND, True)
    with pytest.raises(RuntimeError, match="grad_likelihood must be contiguous"):
        bwd(y, packed, e, e, e, torch.randn(4, 6).t(), 0, 1, 0, 0.0, 1.0, BOUND, True)


# ----------------------------------------------------------------------------- float64
F64_CASES = [("noise", 0.0, 1.0), ("noise", 0.25, 0.3), ("dequantize", 0.0, 1.0), ("none", 0.0, 1.0)]


def _params64(C, seed):
    mats, biases, factors, medians = _params(C, seed)
    return ([t.detach().double().requires_grad_() for t in mats],
            [t.detach().double().requires_grad_() for t in biases],
            [t.detach().double().requires_grad_() for t in factors],
            medians.detach().double().requires_grad_())


@pytest.mark.parametrize("mode,rho,s", F64_CASES)
def test_float64_kernel_matches_reference(mode, rho, s):
    """float64 y on the C++ kernel: y_hat bit for bit (the reference's float32 noise,
    s*u and y + s*u in float64), rates, likelihoods and every gradient to float64
    precision (both sides compute exact float64 math, in different orders)."""
    backend_or_skip("cpu", "cpu")
    shape = (37, 5, 3)
    _compare64(shape, mode, rho, s)
    _compare64((300, 70), mode, rho, s)  # several row blocks and a partial channel tile


def _compare64(shape, mode, rho, s):
    C = shape[1]
    mats, biases, factors, medians = _params64(C, 2)
    g = torch.Generator().manual_seed(3)
    y = (2.0 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    if mode == "noise":  # the likelihood at the float64 y_hat (_reference's is at a float32 one)
        yh, rate, _ = ibm(y, mats, biases, factors, rho=rho, s=s, seed=5, offset=9, bound=BOUND)
        lik = R.likelihood(yh / s, mats, biases, factors, bound=BOUND)
    else:
        yh, rate, lik = _reference(y, mats, biases, factors, medians, mode, 5, 9, rho, s)
    gyh, grate, glik = (torch.randn(shape, generator=g, dtype=torch.float64),
                        torch.randn(shape[0], generator=g, dtype=torch.float64),
                        torch.randn(shape, generator=g, dtype=torch.float64))
    loss = (yh * gyh).sum() + (rate * grate).sum() + (lik * glik).sum()
    leaves = mats + biases + factors + [y, medians]
    want = [torch.zeros_like(t) if w is None else w
            for t, w in zip(leaves, torch.autograd.grad(loss, leaves, allow_unused=True))]
    ops = _ops()
    packed = pack_density(mats, biases, factors, dtype=torch.float64)
    med = medians.detach() if mode == "dequantize" else torch.empty(0, dtype=torch.float64)
    kyh, krate, klik = ops.entropy_bottleneck_fwd(y.detach(), packed, med, MODES[mode], 5, 9, rho, s, BOUND,
                                                  True)
    kgy, kgp = ops.entropy_bottleneck_bwd(y.detach(), packed, med, gyh, grate, glik, MODES[mode], 5, 9, rho,
                                          s, BOUND, True)
    assert kyh.dtype == torch.float64 and krate.dtype == torch.float64 and kgp.dtype == torch.float64
    assert torch.equal(kyh, yh.detach()), "float64 y_hat must match the reference bit for bit"
    tight = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(krate, rate.detach(), **tight)
    torch.testing.assert_close(klik, lik.detach(), **tight)
    torch.testing.assert_close(kgy, want[-2], **tight)
    # packed-row gradients chained back to the parameters by autograd through pack_density
    chained = torch.autograd.grad(packed, mats + biases + factors, kgp[:NUM_PACKED])
    for got, w in zip(chained, want[:-2]):
        torch.testing.assert_close(got, w, rtol=1e-9, atol=1e-11)
    if mode == "dequantize":
        torch.testing.assert_close(kgp[NUM_PACKED], want[-1], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mode,rho,s", F64_CASES)
def test_float64_gradcheck_through_cpp_kernel(mode, rho, s):
    """torch.autograd.gradcheck of the public op with backend="cpu" in float64: the C++
    kernel's analytic gradients to y, every density parameter and the medians against
    finite differences (the float64 path uses libm's exp/log/tanh)."""
    backend_or_skip("cpu", "cpu")
    from cifd_kernels.ops import entropy_bottleneck
    C = 3
    mats, biases, factors, medians = _params64(C, 4)
    y = (1.5 * torch.randn(4, C, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
         ).requires_grad_()
    n_m, n_b = len(mats), len(biases)

    def f(y, *params):
        m, b, fa = params[:n_m], params[n_m:n_m + n_b], params[n_m + n_b:n_m + n_b + len(factors)]
        med = params[-1] if mode == "dequantize" else None
        out = entropy_bottleneck(y, m, b, fa, med, mode=mode, seed=7, offset=3, rho=rho, s=s,
                                 need_likelihood=True, backend="cpu")
        return out.y_hat, out.rate, out.likelihood

    inputs = (y, *mats, *biases, *factors) + ((medians,) if mode == "dequantize" else ())
    # the op really ran the C++ kernel: its outputs equal the raw op's
    out = f(*inputs)
    packed = pack_density(mats, biases, factors, dtype=torch.float64)
    med = medians.detach() if mode == "dequantize" else torch.empty(0, dtype=torch.float64)
    raw = _ops().entropy_bottleneck_fwd(y.detach(), packed.detach(), med, MODES[mode], 7, 3, rho, s, BOUND, True)
    assert all(torch.equal(a.detach(), b) for a, b in zip(out, raw))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("shape,mode,rho,s", [((7, 3), "noise", 0.25, 0.5), ((4097, 193), "noise", 0.25, 0.5),
                                              ((4097, 193), "dequantize", 0.0, 1.0), ((2, 5, 3, 4), "none", 0.0, 1.0),
                                              ((3, 70, 300), "noise", 0.0, 1.0)])
@pytest.mark.parametrize("det", [True, False])
def test_cuda_matches_reference(shape, mode, rho, s, det):
    backend_or_skip("cuda", "cuda")
    _compare(shape, mode, rho, s, device="cuda", offset=(1 << 32) - 100, det=det)


@pytest.mark.gpu
def test_cuda_deterministic_and_half():
    backend_or_skip("cuda", "cuda")
    ops = _ops()
    mats, biases, factors, _ = _params(130, 5, "cuda")
    packed = pack_density(mats, biases, factors)
    for shape in ((3000, 130), (4, 130, 50)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            y = (2 * torch.randn(shape, device="cuda")).to(dtype)
            gyh = torch.randn(shape, device="cuda").to(dtype)
            grate = torch.randn(shape[0], device="cuda")
            runs = [ops.entropy_bottleneck_bwd(y, packed, torch.empty(0, device="cuda"), gyh, grate,
                                               torch.empty(0, device="cuda"), 0, 1, 0, 0.1, 1.0, BOUND, True)
                    for _ in range(2)]
            assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
            f = [ops.entropy_bottleneck_fwd(y, packed, torch.empty(0, device="cuda"), 0, 1, 0, 0.1, 1.0, BOUND,
                                            True) for _ in range(2)]
            assert all(torch.equal(a, b) for a, b in zip(f[0], f[1]))
            # the CPU kernels draw the same y_hat bits
            fc = ops.entropy_bottleneck_fwd(y.cpu(), packed.cpu(), torch.empty(0), 0, 1, 0, 0.1, 1.0, BOUND, True)
            assert torch.equal(fc[0], f[0][0].cpu())
            _close(f[0][1].cpu(), fc[1])


# ----------------------------------------------------------------------------- the fused op
# cifd_C::entropy_bottleneck_fused (python/entropy_bottleneck_fused.cpp): the op of the
# "cpu" and "cuda" backends, eager and traced; its autograd is C++. Its bits must be
# those of its sub-ops composed by hand (pack, forward kernel, backward kernel, unpack of
# the packed gradient), whose kernels the tests above check against the reference.
def _eb_module():
    import importlib
    return importlib.import_module("cifd_kernels.ops.entropy_bottleneck")


def _fused_or_skip():
    _ops()
    if not hasattr(torch.ops.cifd_C, "entropy_bottleneck_fused"):
        pytest.skip("_C built without entropy_bottleneck_fused")


def _fused_on(device):
    """The backend of ``device`` whose calls take the fused op."""
    if device == "cuda":
        backend_or_skip("cuda", "cuda")
        return "cuda"
    return "cpu"


def _public(y, mats, biases, factors, medians, mode, rho, s, need_lik, out_grads, be="cpu"):
    from cifd_kernels.ops import entropy_bottleneck
    out = entropy_bottleneck(y, mats, biases, factors, medians if mode == "dequantize" else None,
                             mode=mode, seed=21, offset=5, rho=rho, s=s, need_likelihood=need_lik,
                             backend=be)
    loss = 0
    for t, g in zip((out.y_hat, out.rate, out.likelihood), out_grads):
        if g is not None and t is not None:
            loss = loss + (t.double() * g).sum()
    wrt = [y] + mats + biases + factors + ([medians] if mode == "dequantize" else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [t for t in out if t is not None] + list(grads)


def _composed(y, mats, biases, factors, medians, mode, rho, s, need_lik, out_grads):
    """What :func:`_public` computes, by the fused op's sub-ops called one by one: the
    outputs, then the gradients of ``sum(out.double() * g)`` (each g reaches its output
    cast to that output's dtype), in :func:`_public`'s order."""
    ops = _ops()
    params = [t.detach() for k in range(5) for t in ([mats[k], biases[k]] + ([factors[k]] if k < 4 else []))]
    yd = y.detach()
    cdt = torch.float64 if y.dtype == torch.float64 else torch.float32
    packed = ops.density_pack(params, cdt == torch.float64)
    med = medians.detach().to(cdt).contiguous() if mode == "dequantize" else torch.empty(0, dtype=cdt)
    y_hat, rate, lik = ops.entropy_bottleneck_fwd(yd, packed, med, MODES[mode], 21, 5, rho, s, 1e-9, need_lik)
    # backward reads the density at the saved y_hat where that gives the same bits
    saved, bmode = ((y_hat, "none") if _eb_module()._saves_y_hat(mode, rho, s, y.dtype) else (yd, mode))
    g_yhat, g_rate, g_lik = (g.to(t.dtype) if g is not None else torch.empty(0, dtype=t.dtype)
                             for g, t in zip(out_grads, (y_hat, rate, lik if need_lik else rate)))
    if not need_lik:
        g_lik = torch.empty(0, dtype=cdt)
    grad_y, grad_packed = ops.entropy_bottleneck_bwd(saved, packed, med, g_yhat, g_rate, g_lik, MODES[bmode],
                                                     21, 5, rho, s, 1e-9, False)
    gp = ops.density_unpack_grad(grad_packed, params)  # H0 b0 a0 ... H4 b4
    g_mats = [gp[3 * k] for k in range(5)]
    g_biases = [gp[3 * k + 1] for k in range(5)]
    g_factors = [gp[3 * k + 2] for k in range(4)]
    outs = [y_hat, rate] + ([lik] if need_lik else [])
    return outs + [grad_y] + g_mats + g_biases + g_factors + ([grad_packed[NUM_PACKED]] if mode == "dequantize"
                                                              else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode,rho,s", [("noise", 0.0, 1.0), ("noise", 0.25, 0.5), ("dequantize", 0.0, 1.0),
                                        ("none", 0.0, 1.0)])
@pytest.mark.parametrize("need_lik", [False, True])
@pytest.mark.parametrize("which", ["all", "rate", "y_hat"])
def test_fused_op_equals_its_sub_ops(dtype, mode, rho, s, need_lik, which, device, monkeypatch):
    """Every output and gradient of the public functional (through the fused op) bit for bit
    against the sub-ops called by hand, with gradients on all outputs or on one (the
    others reach backward as None)."""
    _fused_or_skip()
    eb = _eb_module()
    be = _fused_on(device)
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 runs on the C++ CPU kernel only")
    mats, biases, factors, medians = _params(7, seed=4, device=device)
    cast = (lambda ts: [t.detach().to(torch.float64).requires_grad_() for t in ts]) \
        if dtype == torch.float64 else (lambda ts: ts)
    mats, biases, factors = cast(mats), cast(biases), cast(factors)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    med = medians.detach().to(device, cdt).requires_grad_()
    g = torch.Generator().manual_seed(2)
    y = (3 * torch.randn(13, 7, generator=g)).to(device, dtype).requires_grad_()
    out_grads = [torch.randn(13, 7, generator=g, dtype=torch.float64) if which in ("all", "y_hat") else None,
                 torch.randn(13, generator=g, dtype=torch.float64) if which in ("all", "rate") else None,
                 torch.randn(13, 7, generator=g, dtype=torch.float64) if which == "all" else None]
    out_grads = [t.to(device) if t is not None else None for t in out_grads]
    calls = []
    real = eb._fused_op()
    monkeypatch.setattr(eb, "_fused_op", lambda: (lambda *a: calls.append(1) or real(*a)))
    fused = _public(y, mats, biases, factors, med, mode, rho, s, need_lik, out_grads, be)
    assert calls == [1]  # the fused op was taken
    by_hand = _composed(y, mats, biases, factors, med, mode, rho, s, need_lik, out_grads)
    assert len(fused) == len(by_hand)
    for a, b in zip(fused, by_hand):
        assert a is not None
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def test_fused_op_without_autograd_and_odd_inputs():
    """Inference mode (no autograd key) and no_grad through the fused op: the values of a
    call with autograd; a non-contiguous y and an empty batch."""
    _fused_or_skip()
    from cifd_kernels.ops import entropy_bottleneck
    mats, biases, factors, _ = _params(5, seed=1)
    y = 2 * torch.randn(5, 9)

    def run(yy):
        out = entropy_bottleneck(yy, mats, biases, factors, seed=3, need_likelihood=True, backend="cpu")
        return out.y_hat, out.rate, out.likelihood
    want = tuple(t.detach() for t in run(y.t()))
    want_empty = run(torch.zeros(0, 5))
    with torch.inference_mode():
        got = run(y.t())
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with torch.no_grad():
        got = run(y.t())
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0].grad_fn is None
    got = run(torch.zeros(0, 5))
    assert all(a.shape == b.shape for a, b in zip(got, want_empty))
    loss = got[1].sum() + got[0].sum()
    grads = torch.autograd.grad(loss, mats + biases + factors)
    assert all(torch.equal(gr, torch.zeros_like(p)) for gr, p in zip(grads, mats + biases + factors))


def test_fused_op_argument_errors():
    """Called directly, the fused op rejects what its kernels reject, naming the argument."""
    _fused_or_skip()
    ops = _ops()
    mats, biases, factors, _ = _params(4)
    params = [t.detach() for k in range(5) for t in ([mats[k], biases[k]] + ([factors[k]] if k < 4 else []))]
    y = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="params must hold the 14"):
        ops.entropy_bottleneck_fused(y, params[:13], None, 0, 1, 0, 0.0, 1.0, 1e-9, False, False, False)
    with pytest.raises(RuntimeError, match="mode must be"):
        ops.entropy_bottleneck_fused(y, params, None, 7, 1, 0, 0.0, 1.0, 1e-9, False, False, False)
    with pytest.raises(RuntimeError, match="seed"):
        ops.entropy_bottleneck_fused(y, params, None, 0, -1, 0, 0.0, 1.0, 1e-9, False, False, False)
    with pytest.raises(RuntimeError, match="medians must be"):
        ops.entropy_bottleneck_fused(y, params, torch.zeros(3), 1, 1, 0, 0.0, 1.0, 1e-9, False, False, False)
    with pytest.raises(RuntimeError, match="y must be"):
        ops.entropy_bottleneck_fused(y.int(), params, None, 0, 1, 0, 0.0, 1.0, 1e-9, False, False, False)
    with pytest.raises(RuntimeError, match="groups must be >= 0"):
        ops.entropy_bottleneck_fused(y, params, None, 0, 1, 0, 0.0, 1.0, 1e-9, False, False, False, -1)
    with pytest.raises(RuntimeError, match=r"y must be \[G=2"):  # groups: y [G, N, C]
        ops.entropy_bottleneck_fused(y, params, None, 0, 1, 0, 0.0, 1.0, 1e-9, False, False, False, 2)


def test_fused_op_takes_strided_medians():
    """Dequantize mode with medians that are a strided view (the RDM bank's eval path
    hands over the quantiles' middle column): the values and the medians' gradient of
    the same medians made contiguous."""
    _fused_or_skip()
    ops = _ops()
    mats, biases, factors, _ = _params(6, seed=8)
    params = [t.detach() for k in range(5) for t in ([mats[k], biases[k]] + ([factors[k]] if k < 4 else []))]
    quant = torch.randn(6, 1, 3, generator=torch.Generator().manual_seed(1))
    y = 3 * torch.randn(5, 6, generator=torch.Generator().manual_seed(2))

    def run(med):
        out = ops.entropy_bottleneck_fused(y, params, med, 1, 0, 0, 0.0, 1.0, 1e-9, True, True, False)
        return list(out) + list(torch.autograd.grad(out[1].sum() + out[2].sum(), med))
    strided = quant[:, 0, 1].requires_grad_()
    assert not strided.is_contiguous()
    got = run(strided)
    want = run(quant[:, 0, 1].contiguous().requires_grad_())
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_fused_op_is_the_traced_route_and_passes_opcheck():
    """Under torch.compile a "cpu" call takes the same fused op as eagerly: its sub-ops
    have fake kernels, so AOTAutograd traces through its C++ autograd, and the traced
    forward and backward are the eager step's C++ ops (pack, fwd; bwd, unpack), with
    no Python custom op. opcheck (fake kernels, autograd registration, AOT dispatch)
    passes for one problem, a seed tensor, groups and the dequantize mode."""
    _fused_or_skip()
    from functorch.compile import make_boxed_func
    from cifd_kernels.nn import EntropyBottleneck
    from cifd_kernels.ops.density_pack import _flat
    eb = _eb_module()
    assert eb._fused_op() is not None  # registers the fakes
    torch.manual_seed(0)
    m = EntropyBottleneck(6, backend="cpu")
    y = torch.randn(5, 6, requires_grad=True)
    params = _flat(list(m.matrices), list(m.biases), list(m.factors))
    op = torch.ops.cifd_C.entropy_bottleneck_fused.default
    torch.library.opcheck(op, (y, params, None, 0, 3, 0, 0.25, 0.5, 1e-9, True, False, False, 0))
    # a seed tensor (drawn in a traced graph) in place of the seed
    torch.library.opcheck(op, (y, params, None, 0, 0, 0, 0.25, 0.5, 1e-9, True, False, False, 0,
                               torch.tensor(3)))
    torch.library.opcheck(op, (y.detach().view(1, 5, 6).expand(2, 5, 6).contiguous().requires_grad_(),
                               _flat(*[[torch.cat([t, t]) for t in ts] for ts in
                                       (list(m.matrices), list(m.biases), list(m.factors))]),
                               None, 0, 3, 0, 0.0, 1.0, 1e-9, False, True, True, 2))
    med = torch.zeros(6, requires_grad=True)
    torch.library.opcheck(op, (y, params, med, 1, 0, 0, 0.0, 1.0, 1e-9, True, False, False, 0))

    traced = {"fwd": [], "bwd": []}

    def recorder(key):
        def compiler(gm, _):
            traced[key].extend(str(n.target) for n in gm.graph.nodes
                               if n.op == "call_function" and "cifd" in str(n.target))
            return make_boxed_func(gm.forward)
        return compiler

    def f(y, seed: int):
        y_hat, lik = m(y, seed=seed)
        return y_hat, m.rate(lik)

    aot = torch._dynamo.backends.common.aot_autograd(fw_compiler=recorder("fwd"), bw_compiler=recorder("bwd"))
    torch._dynamo.reset()
    y_hat, rate = torch.compile(f, fullgraph=True, backend=aot)(y, 3)
    rate.sum().backward()
    assert traced["fwd"] == ["cifd_C.density_pack.default", "cifd_C.entropy_bottleneck_fwd.default"]
    assert traced["bwd"] == ["cifd_C.entropy_bottleneck_bwd.default", "cifd_C.density_unpack_grad.default"]


def test_seed_tensor_argument_of_the_raw_ops():
    """The kernels' ops take the seed as a 0-dim int64 CPU tensor in place of the int (what
    a graph that drew its seed hands them): the int's bits, its range check, and a
    message naming seed_tensor for any other tensor."""
    _fused_or_skip()
    ops = _ops()
    mats, biases, factors, _ = _params(4, seed=2)
    params = [t.detach() for k in range(5) for t in ([mats[k], biases[k]] + ([factors[k]] if k < 4 else []))]
    y = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    packed, none = ops.density_pack(params, False), torch.empty(0)
    s = 2**62 + 5
    want = ops.entropy_bottleneck_fwd(y, packed, none, 0, s, 3, 0.25, 0.5, 1e-9, True)
    got = ops.entropy_bottleneck_fwd(y, packed, none, 0, 0, 3, 0.25, 0.5, 1e-9, True, 0, torch.tensor(s))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    want = ops.entropy_bottleneck_bwd(y, packed, none, g, none, none, 0, s, 3, 0.25, 0.5, 1e-9, False)
    got = ops.entropy_bottleneck_bwd(y, packed, none, g, none, none, 0, 7, 3, 0.25, 0.5, 1e-9, False, 0,
                                     torch.tensor(s))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    keep_want, keep_got = torch.empty(9, dtype=torch.bool), torch.empty(9, dtype=torch.bool)
    ops.philox_keep_mask_out(keep_want, s, 2, 0.4)
    ops.philox_keep_mask_out(keep_got, 0, 2, 0.4, torch.tensor(s))
    assert torch.equal(keep_got, keep_want)
    for bad in (torch.tensor([3]), torch.tensor(3, dtype=torch.int32), torch.tensor(3.0)):
        with pytest.raises(RuntimeError, match="seed_tensor must be a 0-dim int64 CPU tensor"):
            ops.entropy_bottleneck_fwd(y, packed, none, 0, 0, 3, 0.0, 1.0, 1e-9, False, 0, bad)
        with pytest.raises(RuntimeError, match="seed_tensor must be a 0-dim int64 CPU tensor"):
            ops.philox_keep_mask_out(keep_got, 0, 2, 0.4, bad)
    with pytest.raises(RuntimeError, match=r"seed must be in \[0, 2\*\*63\), got -1"):
        ops.entropy_bottleneck_fwd(y, packed, none, 0, 0, 3, 0.0, 1.0, 1e-9, False, 0, torch.tensor(-1))
    with pytest.raises(RuntimeError, match=r"seed must be in \[0, 2\*\*63\), got -1"):
        ops.entropy_bottleneck_bwd(y, packed, none, g, none, none, 0, 0, 3, 0.0, 1.0, 1e-9, False, 0,
                                   torch.tensor(-1))
