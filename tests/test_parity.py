# SPDX-License-Identifier: Apache-2.0
"""Property-based parity of every backend against the reference (hypothesis, derandomized).

For each op (Philox, the entropy bottleneck, the IBM, cifd_loss with and without
groups, the RDM bank training and frozen) and each kernel backend reachable on a CPU
(``cpu``: the C++ kernels; ``triton``: under ``TRITON_INTERPRET=1``), hypothesis draws
a case (shape, dtype, mode, hyperparameters, strides, special values, or a bad input)
and runs it through ``backend="reference"`` and through the kernel backend. Each case
has a kind, decided when it is drawn:

* ``valid``: the reference must accept it, and the backend must give the same outputs
  and the same gradients for a random ``grad_output``: y_hat, keep flags and Philox
  bits exactly; rates, likelihoods, losses and gradients to the float32 tolerances of
  the per-op tests (test_cpp_entropy_bottleneck.py, test_triton_entropy_bottleneck.py,
  test_cifd_loss.py, test_rdm_bank.py), float16/bfloat16 by the flash-attention rule
  (the kernel's error against the float32 reference at most 2x that of the reference
  run in the same dtype, plus a small floor). NaN and inf inputs are valid: they must
  land where the reference puts them.
* ``invalid``: the reference must reject it (wrong dtype, device, shape, a bad
  hyperparameter, an out-of-range label), and the backend must raise the same
  exception type.
* ``unsupported``: the reference accepts it but the kernel backend documents that it
  does not (float64 on Triton and in the loss and bank kernels, other entropy-model
  filters, tensors on the meta device): the named backend must raise
  :class:`cifd_kernels.BackendUnavailableError`.
* ``either``: no rule about acceptance (a value the contract leaves open): if the
  reference rejects, the backend raises the same type; if it accepts, the outputs match.

Non-contiguous inputs are always valid and must match. The bad-input properties run
once per kind of bad input (its own test id, a few drawn cases each), so every kind is
tried on every run and a mismatch names its kind. Every property counts the cases it
ran; the last test checks the total (``CASE_FLOOR``; about 830 drawn cases, ~40 s of one
CPU core, most of it the Triton interpreter).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from cifd_kernels import BackendUnavailableError
from cifd_kernels.nn.ibm import IBM
from cifd_kernels.nn.rdm import RDMBank
from cifd_kernels.ops import cifd_loss as loss_ops
from cifd_kernels.ops import philox as philox_ops
from cifd_kernels.ops import rdm_bank as bank_ops
from cifd_kernels.ops.entropy_bottleneck import entropy_bottleneck
from cifd_kernels.reference import cifd_loss as loss_ref
from cifd_kernels.reference import entropy_bottleneck as eb_ref
from cifd_kernels.reference import rdm as rdm_ref
from helpers import backend_or_skip

KERNELS = ["cpu", "triton"]
IGNORE = -100
HALVES = (torch.float16, torch.bfloat16)

# Cases per property and backend. The C++ kernels take milliseconds; the Triton
# interpreter runs numpy per program, so its shapes stay tiny and its counts small.
EXAMPLES = {
    "philox": {"cpu": 60, "triton": 20},
    "entropy_bottleneck": {"cpu": 150, "triton": 24},
    "entropy_bottleneck_bad": {"cpu": 4, "triton": 2},  # per bad kind (EB_BAD)
    "ibm": {"cpu": 30, "triton": 8},
    "ibm_bad_hparams": {"cpu": 15, "triton": 5},
    "cifd_loss": {"cpu": 120, "triton": 20},
    "cifd_loss_grouped": {"cpu": 25, "triton": 6},
    "cifd_loss_bad": {"cpu": 3, "triton": 1},  # per bad kind (LOSS_BAD)
    "cifd_loss_labels": {"cpu": 12, "triton": 4},
    "rdm_bank": {"cpu": 50, "triton": 8},
    "rdm_bank_bad": {"cpu": 3, "triton": 1},  # per bad kind (BANK_BAD)
    "rdm_bank_bad_hparams": {"cpu": 3, "triton": 1},  # per hyperparameter (BANK_HPARAMS)
}
CASE_FLOOR = 500
COUNTS: collections.Counter = collections.Counter()


def _settings(n: int, backend: str):
    # Shrinking replays many cases: worth it where they take milliseconds, not on the
    # interpreter (a Triton failure reports the drawn case as it is, see _Case.describe).
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if backend != "triton" else [])
    return settings(derandomize=True, max_examples=n, deadline=None, database=None, phases=phases,
                    suppress_health_check=list(HealthCheck), print_blob=False)


def _run_property(name: str, be: str, strategy, check, explicit=(), kind: str = "") -> None:
    """Run ``check(be, case)`` on the ``explicit`` cases, then on EXAMPLES[name][be] drawn
    ones (for each ``kind`` of bad input, where the property has kinds); assert they all ran."""
    backend_or_skip(be, "cpu")
    n = EXAMPLES[name][be]
    key = f"{name}[{be}{'-' + kind if kind else ''}]"
    before = COUNTS[key]

    def prop(case):
        check(be, case)
        COUNTS[key] += 1

    prop = given(strategy)(prop)
    for case in reversed(explicit):
        prop = example(_Case(case))(prop)
    _settings(n, be)(prop)()
    ran = COUNTS[key] - before
    assert ran >= n, f"{key}: {ran} of {n} cases ran"


# ----------------------------------------------------------------------------- the parity rule
class _Case(dict):
    """A drawn case: its fields, printed as a reproducer on failure."""

    def describe(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.items())


def _outcome(fn):
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 (the property is about which exception)
        return None, e


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _parity(kind: str, case: _Case, run_ref, run_be, compare) -> None:
    """The property (module docstring) for one case."""
    want, werr = _outcome(run_ref)
    got, gerr = _outcome(run_be)
    where = f"[{kind}] {case.describe()}"
    if kind == "valid" and werr is not None:
        raise AssertionError(f"the reference rejected a valid case ({_err(werr)}): {where}") from werr
    if kind == "invalid" and werr is None:
        raise AssertionError(f"the reference accepted an invalid case: {where}")
    if kind == "unsupported":
        if werr is not None:
            raise AssertionError(f"the reference rejected a case it should run ({_err(werr)}): "
                                 f"{where}") from werr
        if not isinstance(gerr, BackendUnavailableError):
            raise AssertionError(f"expected BackendUnavailableError from the backend, got "
                                 f"{_err(gerr) if gerr else 'a result'}: {where}") from gerr
        return
    if werr is not None:
        if gerr is None:
            raise AssertionError(f"the reference raised {_err(werr)}, the backend accepted: {where}")
        if type(gerr) is not type(werr):
            raise AssertionError(f"the reference raised {_err(werr)}, the backend {_err(gerr)}: "
                                 f"{where}") from gerr
        return
    if gerr is not None:
        raise AssertionError(f"the reference accepted, the backend raised {_err(gerr)}: {where}") from gerr
    try:
        compare(got, want)
    except AssertionError as e:
        raise AssertionError(f"{e}\n  case: {where}") from None


# ----------------------------------------------------------------------------- comparisons
def _same_specials(a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
    """NaN and +-inf where the reference has them; returns the mask of finite entries."""
    a, b = a.double(), b.double()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN positions differ"
    inf = torch.isinf(b)
    assert torch.equal(torch.isinf(a), inf) and torch.equal(a[inf], b[inf]), f"{name}: inf entries differ"
    return torch.isfinite(b)


def _meta(a: torch.Tensor, b: torch.Tensor, name: str, check_dtype: bool = True) -> None:
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs the reference's {tuple(b.shape)}"
    assert a.dtype == b.dtype or not check_dtype, f"{name}: dtype {a.dtype} vs the reference's {b.dtype}"


def _exact(a, b, name: str) -> None:
    _meta(a, b, name)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name} (bits): {m}")


def _close(a, b, name: str, rtol: float, atol_rel: float, check_dtype: bool = True) -> None:
    """float32 rule of the per-op tests: ``rtol`` and an absolute floor scaled to the
    reference's largest finite entry (kernels fuse multiply-adds and sum in another order)."""
    _meta(a, b, name, check_dtype)
    fin = _same_specials(a, b, name)
    a, b = a.double()[fin], b.double()[fin]
    atol = atol_rel * (1.0 + (b.abs().max().item() if b.numel() else 0.0))
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _flash(got, lo, gold, name: str, k: float, eps_rel: float, check_dtype: bool = True,
           ulps: float = 1.0, ulp_of=None) -> None:
    """flash-attention's rule: max |got - gold| <= k max |lo - gold| + eps_rel (1 + max |gold|),
    ``lo`` the reference run in the kernel's precision, ``gold`` the higher-precision one.

    A float16/bfloat16 output is the kernel's float32 value rounded once; where that
    value and the reference's straddle a rounding boundary the two land one ulp apart,
    an error that the reference's own maximum (at other elements) need not cover. So
    each element of such an output is also allowed ``ulps`` ulps of its dtype at its
    size, or at the size of ``ulp_of`` (the terms it sums, where they cancel) (the
    per-op tests' fixed cases pass without it; hundreds of random ones do not)."""
    _meta(got, lo, name, check_dtype)
    fin = _same_specials(got, lo, name) & torch.isfinite(gold.double())
    g, r, o = got.double()[fin], lo.double()[fin], gold.double()[fin]
    if o.numel() == 0:
        return
    err_r = (r - o).abs().max().item()
    bound = k * err_r + eps_rel * (1.0 + o.abs().max().item())
    size = o.abs() if ulp_of is None else ulp_of.double()[fin]
    ulp = ulps * torch.finfo(got.dtype).eps * size if got.dtype in HALVES else torch.zeros_like(o)
    excess = ((g - o).abs() - ulp).max().item()
    assert excess <= bound, (f"{name}: error {(g - o).abs().max().item():.3g} (less the ulps: {excess:.3g}) > "
                             f"{k:g} x reference error {err_r:.3g} + floor = {bound:.3g}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _strided(base: torch.Tensor, how: str) -> torch.Tensor:
    """``base``'s values in a non-contiguous layout (same shape)."""
    if how == "contiguous" or base.dim() == 0:
        return base
    if how == "transposed" and base.dim() >= 2:
        return base.transpose(0, -1).contiguous().transpose(0, -1)
    padded = torch.stack([base, torch.full_like(base, 7.0) if base.is_floating_point() else base], -1)
    return padded[..., 0]  # every other element ("strided")


def _leaf(t: torch.Tensor, grad: bool = True) -> torch.Tensor:
    t = t.detach()
    return t.requires_grad_() if grad and t.is_floating_point() else t


def _grads(outs, gouts, wrt):
    pairs = [(o, g) for o, g in zip(outs, gouts) if o is not None and g is not None and o.requires_grad]
    if not pairs:
        return [torch.zeros_like(w) for w in wrt]
    gr = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(w) if v is None else v for v, w in zip(gr, wrt)]


# ----------------------------------------------------------------------------- Philox
SEEDS = st.sampled_from([0, 1, 123, 2**32 - 1, 2**32, 2**40 + 7, 0xDEADBEEF, 2**63 - 1]) | \
    st.integers(0, 2**63 - 1)
OFFSETS = st.sampled_from([0, 5, 2**32 - 3, 2**32 - 300, 2**33 + 1, 2**62]) | st.integers(0, 2**40)


@st.composite
def philox_cases(draw, be):
    big = be == "cpu"
    dims = draw(st.lists(st.sampled_from([0, 1, 2, 3, 7, 31] + ([193, 1025] if big else [])),
                         min_size=0, max_size=3))
    c = _Case(op=draw(st.sampled_from(["uniform", "keep_mask"])), shape=tuple(dims), seed=draw(SEEDS),
              offset=draw(OFFSETS), kind="valid")
    if math.prod(dims) > 4096:
        c["shape"] = tuple(dims[:1])
    if c["op"] == "keep_mask":
        c["rho"] = draw(st.sampled_from([0.0, 1.0, 0.25, 0.5]) | st.floats(0.0, 1.0))
    else:
        c["dtype"] = draw(st.sampled_from([None, torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    bad = draw(st.sampled_from([None] * 3 + ["seed_negative", "seed_too_big", "seed_float", "offset_negative",
                                             "offset_overflow", "shape_negative", "rho", "rho_type", "dtype_int"]))
    if bad is not None:
        c["kind"] = "invalid"
        c["bad"] = bad
        if bad == "seed_negative":
            c["seed"] = -1
        elif bad == "seed_too_big":
            c["seed"] = 2**63
        elif bad == "seed_float":
            c["seed"] = 1.0
        elif bad == "offset_negative":
            c["offset"] = -draw(st.integers(1, 2**40))
        elif bad == "offset_overflow":
            c["shape"], c["offset"] = (5,), 2**63 - 3
        elif bad == "shape_negative":
            c["shape"] = (3, -1)
        elif bad in ("rho", "rho_type"):
            c["op"] = "keep_mask"
            c.pop("dtype", None)
            c["rho"] = draw(st.sampled_from([-0.1, 1.5, float("nan"), float("inf")])) if bad == "rho" else True
        else:
            c["op"] = "uniform"
            c.pop("rho", None)
            c["dtype"] = torch.int32
    return c


def _check_philox(be, c):
    def run(b):
        if c["op"] == "uniform":
            return philox_ops.philox_uniform(c["shape"], c["seed"], c["offset"], dtype=c["dtype"], backend=b)
        return philox_ops.philox_keep_mask(c["shape"], c["seed"], c["offset"], c["rho"], backend=b)
    _parity(c["kind"], c, lambda: run("reference"), lambda: run(be), lambda a, b: _exact(a, b, c["op"]))


@pytest.mark.parametrize("be", KERNELS)
def test_philox_parity(be):
    _run_property("philox", be, philox_cases(be), _check_philox)


# ----------------------------------------------------------------------------- entropy bottleneck
def _eb_params(C, seed, dtype=torch.float32, filters=(3, 3, 3, 3)):
    """CompressAI-initialised density parameters perturbed far from the init (every
    factor and bias matters), and medians [C]."""
    g = _gen(seed)
    p = eb_ref.init_params(C, filters, generator=g)

    def pert(ts, scale):
        return [(t + scale * torch.randn(t.shape, generator=g)).to(dtype) for t in ts]
    return (pert(p["matrices"], 0.4), pert(p["biases"], 0.5), pert(p["factors"], 0.6),
            (0.3 * torch.randn(C, generator=g)).to(dtype))


def _values(shape, seed, scale, special, dtype):
    """Seeded normal values (float64 draw, cast) with NaN/inf/huge entries on request."""
    v = scale * torch.randn(shape, generator=_gen(seed), dtype=torch.float64)
    if special != "none" and v.numel() > 0:
        flat = v.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 7),), generator=_gen(seed + 1))
        flat[idx] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": 1e4}[special]
        if special == "huge":
            flat[idx[::2]] = -1e4
    return v.to(dtype)


SPECIALS = st.sampled_from(["none"] * 8 + ["nan", "inf", "-inf", "huge"])
LAYOUTS = st.sampled_from(["contiguous", "contiguous", "transposed", "strided"])


@st.composite
def eb_cases(draw, be):
    tiny = be == "triton"
    batch = draw(st.sampled_from([0, 1, 2, 3, 5] + ([] if tiny else [9, 33, 130])))
    C = draw(st.sampled_from([1, 3, 4, 5] + ([] if tiny else [8, 17, 33, 70, 193])))
    spatial = draw(st.sampled_from([(), (), (1,), (3,), (0,), (2, 3)]))
    dtypes = [torch.float32] * 3 + list(HALVES) + ([torch.float64] if be == "cpu" else [])
    c = _Case(shape=(batch, C) + spatial, dtype=draw(st.sampled_from(dtypes)),
              mode=draw(st.sampled_from(["noise", "noise", "dequantize", "none"])),
              seed=draw(SEEDS), offset=draw(OFFSETS), data=draw(st.integers(0, 2**16)),
              scale=draw(st.sampled_from([0.3, 3.0, 30.0])), special=draw(SPECIALS), layout=draw(LAYOUTS),
              need_likelihood=draw(st.booleans()), deterministic=draw(st.booleans()), rho=0.0, s=1.0,
              kind="valid")
    if math.prod(c["shape"]) > (60 if tiny else 20000):
        c["shape"] = (min(batch, 3), C) + spatial[:1]
    if c["mode"] == "noise" and draw(st.booleans()):
        c["rho"] = draw(st.sampled_from([0.25, 0.9, 1.0]) | st.floats(0.0, 1.0))
        c["s"] = draw(st.sampled_from([1.0, 0.5, 2.0]) | st.floats(0.01, 4.0))
    if c["offset"] + math.prod(c["shape"]) >= 2**63:
        c["offset"] = 2**62
    return c


def _eb_inputs(c):
    dtype = c["dtype"]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    mats, biases, facs, med = _eb_params(c["shape"][1], c["data"] + 7, pdt, c.get("filters", (3, 3, 3, 3)))
    y = _strided(_values(c["shape"], c["data"], c["scale"], c["special"], dtype), c["layout"])
    g = _gen(c["data"] + 3)
    grads = (torch.randn(c["shape"], generator=g).to(dtype),
             torch.randn(c["shape"][0], generator=g).to(pdt),
             torch.randn(c["shape"], generator=g).to(pdt) if c["need_likelihood"] else None)
    return y, (mats, biases, facs), med, grads


def _eb_run(b, c, y, params, med, grads, grad=True, upcast=None):
    """Forward and, with ``grad``, the gradients of y_hat, rate (and likelihood) against
    ``grads`` to y, every density parameter and the medians; ``upcast`` runs on copies
    in that dtype (the gold of the tolerance rules)."""
    cast = (lambda t: t.detach().to(upcast)) if upcast is not None else (lambda t: t)
    y = _leaf(cast(y), grad)
    mats, biases, facs = ([_leaf(cast(t), grad) for t in ts] for ts in params)
    dq = c["mode"] == "dequantize"
    med = _leaf(cast(med), grad) if dq and med is not None else None
    out = entropy_bottleneck(y, mats, biases, facs, med, mode=c["mode"], seed=c["seed"], offset=c["offset"],
                             rho=c["rho"], s=c["s"], need_likelihood=c["need_likelihood"],
                             deterministic=c["deterministic"], backend=b)
    outs = [out.y_hat, out.rate, out.likelihood]
    if not grad:
        return outs, None
    wrt = [y] + mats + biases + facs + ([med] if med is not None else [])
    gs = [None if g is None else cast(g) for g in grads]
    return outs, _grads(outs, gs, wrt)


def _eb_compare(c, y, params, med, grads):
    dtype = c["dtype"]
    names = ["y_hat", "rate", "likelihood"]

    def compare(got, want):
        (go, gg), (wo, wg) = got, want
        _exact(go[0], wo[0], "y_hat")
        assert (go[2] is None) == (wo[2] is None), "likelihood returned on one side only"
        if dtype == torch.float64:  # exact float64 math on both sides, in different orders
            for name, a, b in zip(names[1:] + [f"grad {i}" for i in range(len(gg))], go[1:] + gg, wo[1:] + wg):
                if a is not None:
                    _close(a, b, name, rtol=1e-9, atol_rel=1e-11)
            return
        if dtype == torch.float32:
            for name, a, b in zip(names[1:], go[1:], wo[1:]):
                if a is not None:
                    _close(a, b, name, rtol=2e-4, atol_rel=2e-5)
            # Gradients sum -g/p terms over N*S elements: flash-attention's rule against a
            # float64 gold with K = 4 (test_triton_entropy_bottleneck.py's measured spread).
            gold = _eb_run("reference", c, y, params, med, grads, upcast=torch.float64)[1]
            for i, (a, b, o) in enumerate(zip(gg, wg, gold)):
                _flash(a, b, o, f"grad {i}", k=4.0, eps_rel=2e-5)
            return
        # float16/bfloat16: against the float32 reference on the same (upcast) values
        gold_o, gold_g = _eb_run("reference", c, y, params, med, grads, upcast=torch.float32)
        for name, a, b, o in zip(names[1:], go[1:], wo[1:], gold_o[1:]):
            if a is not None:
                _flash(a, b, o, name, k=2.0, eps_rel=1e-4)
        for i, (a, b, o) in enumerate(zip(gg, wg, gold_g)):
            _flash(a, b, o, f"grad {i}", k=2.0, eps_rel=1e-4)
    return compare


def _check_eb(be, c):
    y, params, med, grads = _eb_inputs(c)
    grad = c["kind"] == "valid"
    _parity(c["kind"], c, lambda: _eb_run("reference", c, y, params, med, grads, grad),
            lambda: _eb_run(be, c, y, params, med, grads, grad), _eb_compare(c, y, params, med, grads))


def _eb_case(**kw):
    c = dict(shape=(2, 3, 3), dtype=torch.float32, mode="noise", seed=5, offset=2**32 - 7, data=1, scale=3.0,
             special="none", layout="contiguous", need_likelihood=True, deterministic=False, rho=0.0, s=1.0,
             kind="valid")
    c.update(kw)
    return c


# Always run (before the drawn cases, which a small count may not bring there): NaN and
# inf in y in every mode, and the IBM's masked, scaled noise.
EB_EXPLICIT = [_eb_case(mode=m, special=sp) for m in ("noise", "dequantize", "none") for sp in ("nan", "inf")] + [
    _eb_case(rho=0.25, s=2.0), _eb_case(rho=0.5, s=0.5, dtype=torch.bfloat16, layout="transposed")]


@pytest.mark.parametrize("be", KERNELS)
def test_entropy_bottleneck_parity(be):
    """Valid inputs: every mode (noise with and without rho masking and s, dequantize,
    none), dtypes, shapes from an empty batch to C = 193, strides, NaN/inf."""
    _run_property("entropy_bottleneck", be, eb_cases(be), _check_eb, EB_EXPLICIT)


EB_BAD = ["y_int", "y_1d", "y_channels", "medians_missing", "medians_shape", "mode", "rho_range", "rho_type",
          "s_nonfinite", "s_nonpositive", "seed_negative", "seed_type", "seed_unused", "offset_overflow",
          "y_meta_params_cpu", "all_meta", "filters", "float64_triton"]


EB_BAD_PARAMS = [(be, bad) for be in KERNELS for bad in EB_BAD if bad != "float64_triton" or be == "triton"]


@st.composite
def eb_bad_cases(draw, be, bad):
    c = draw(eb_cases(be))
    c.update(special="none", need_likelihood=False)
    c["bad"], c["kind"] = bad, "invalid"
    if c["dtype"] == torch.float64 and bad not in ("float64_triton",):
        c["dtype"] = torch.float32
    if bad == "y_int":
        c["dtype"] = draw(st.sampled_from([torch.int32, torch.int64, torch.bool]))
    elif bad == "y_1d":
        c["shape"] = (c["shape"][0],)
    elif bad == "y_channels":
        c["wrong_c"] = True
    elif bad == "medians_missing":
        c["mode"], c["drop_medians"] = "dequantize", True
    elif bad == "medians_shape":
        c["mode"], c["medians_shape"] = "dequantize", c["shape"][1] + 1
    elif bad == "mode":
        c["mode"] = draw(st.sampled_from(["round", "", "Noise"]))
    elif bad == "rho_range":
        c["mode"], c["rho"] = "noise", draw(st.sampled_from([-0.5, 1.5, float("nan"), float("inf")]))
    elif bad == "rho_type":
        c["mode"], c["rho"] = "noise", draw(st.sampled_from([True, "0.5", None]))
    elif bad == "s_nonfinite":
        c["mode"], c["s"] = "noise", draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    elif bad == "s_nonpositive":  # the noise width: finite and > 0 (IBM docstring)
        c["mode"], c["s"] = "noise", draw(st.sampled_from([-1.0, -0.5, 0.0]))
    elif bad == "seed_negative":
        c["mode"], c["seed"] = "noise", -draw(st.integers(1, 2**40))
    elif bad == "seed_type":
        c["mode"], c["seed"] = "noise", draw(st.sampled_from([1.5, "3", None]))
    elif bad == "seed_unused":  # dequantize and none draw nothing: the contract leaves it open
        c["mode"], c["kind"] = draw(st.sampled_from(["dequantize", "none"])), "either"
        if draw(st.booleans()):
            c["seed"] = draw(st.sampled_from([-1, None, 1.5]))
        else:
            c["shape"], c["offset"] = (3, c["shape"][1]), 2**63 - 2
    elif bad == "offset_overflow":
        c["mode"], c["shape"], c["offset"] = "noise", (3, c["shape"][1]), 2**63 - 2
    elif bad in ("y_meta_params_cpu", "all_meta"):
        c["device"] = "meta"
        c["kind"] = "invalid" if bad == "y_meta_params_cpu" else "device"
    elif bad == "filters":
        c["filters"], c["kind"] = draw(st.sampled_from([(3, 3), (2, 4, 3, 3, 1), (3, 3, 3)])), "unsupported"
    elif bad == "float64_triton":
        c["dtype"], c["kind"] = torch.float64, "unsupported"
    return c


def _check_eb_bad(be, c):
    dtype = c["dtype"]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    mats, biases, facs, med = _eb_params(c["shape"][1] if len(c["shape"]) > 1 else 3, c["data"] + 7, pdt,
                                         c.get("filters", (3, 3, 3, 3)))
    C = mats[0].shape[0]
    shape = c["shape"]
    if c.get("wrong_c"):
        shape = (shape[0], C + 1) + tuple(shape[2:])
    y = _values(shape, c["data"], c["scale"], "none", torch.float64)
    y = y.to(dtype) if dtype.is_floating_point else y.round().to(dtype)
    y = _strided(y, c["layout"])
    if "medians_shape" in c:
        med = torch.zeros(c["medians_shape"])
    if c.get("drop_medians"):
        med = None
    if c.get("device") == "meta":
        y = y.to("meta")
        if c["bad"] == "all_meta":
            mats, biases, facs = ([t.to("meta") for t in ts] for ts in (mats, biases, facs))
            med = med.to("meta") if med is not None else None

    def run(b):
        out = entropy_bottleneck(y, mats, biases, facs, med, mode=c["mode"], seed=c["seed"], offset=c["offset"],
                                 rho=c["rho"], s=c["s"], backend=b)
        return [out.y_hat, out.rate]

    def compare(got, want):  # "either" cases the reference accepts
        _exact(got[0], want[0], "y_hat")
        _close(got[1], want[1], "rate", rtol=2e-4, atol_rel=2e-5)

    kind = c["kind"]
    if kind == "device":  # all on meta: the kernels do not run there
        kind = "unsupported" if _outcome(lambda: run("reference"))[1] is None else "invalid"
    _parity(kind, c, lambda: run("reference"), lambda: run(be), compare)


@pytest.mark.parametrize("be,bad", EB_BAD_PARAMS)
def test_entropy_bottleneck_rejects_like_reference(be, bad):
    """Bad inputs: wrong dtype, shape, device, medians, mode, rho, s, seed and offset; and
    what the kernels document they do not take (other filters, float64 on Triton, meta)."""
    _run_property("entropy_bottleneck_bad", be, eb_bad_cases(be, bad), _check_eb_bad, kind=bad)


# ----------------------------------------------------------------------------- IBM module
@st.composite
def ibm_cases(draw, be):
    tiny = be == "triton"
    dtypes = [torch.float32, torch.float32] + list(HALVES) + ([torch.float64] if be == "cpu" else [])
    return _Case(C=draw(st.sampled_from([1, 3, 5] + ([] if tiny else [32, 70]))),
                 batch=draw(st.sampled_from([0, 1, 3] + ([] if tiny else [16, 33]))),
                 spatial=draw(st.sampled_from([(), (), (2,)])), dtype=draw(st.sampled_from(dtypes)),
                 rho=draw(st.sampled_from([0.0, 0.0, 0.25, 0.9])), s=draw(st.sampled_from([1.0, 0.5, 3.0])),
                 training=draw(st.sampled_from([True, True, True, False])), seed=draw(SEEDS),
                 offset=draw(OFFSETS), data=draw(st.integers(0, 2**16)), layout=draw(LAYOUTS),
                 special=draw(SPECIALS), kind="valid")


def _ibm_module(c, dtype):
    m = IBM(c["C"], rho=c["rho"], s=c["s"])
    mats, biases, facs, _ = _eb_params(c["C"], c["data"] + 11)
    with torch.no_grad():
        for p, v in zip(list(m.matrices) + list(m.biases) + list(m.factors), mats + biases + facs):
            p.copy_(v)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    return m.to(pdt).train(c["training"])


def _check_ibm(be, c):
    shape = (c["batch"], c["C"]) + c["spatial"]
    offset = min(c["offset"], 2**62)
    base = _ibm_module(c, c["dtype"])
    w = _strided(_values(shape, c["data"], 3.0, c["special"], c["dtype"]), c["layout"])
    g = _gen(c["data"] + 5)
    g_w = torch.randn(shape, generator=g).to(c["dtype"])
    g_r = torch.randn(c["batch"], generator=g)

    def run(b, module=None, dt=None):
        m = copy.deepcopy(module if module is not None else base)
        m.backend = b
        ww = _leaf(w.to(dt) if dt is not None else w)
        w_hat, rate = m(ww, seed=c["seed"], offset=offset)
        wrt = [ww] + list(m.matrices) + list(m.biases) + list(m.factors)
        return [w_hat, rate], _grads([w_hat, rate], [g_w.to(w_hat.dtype), g_r.to(rate.dtype)], wrt)

    def compare(got, want):
        (go, gg), (wo, wg) = got, want
        _exact(go[0], wo[0], "w_hat")
        if c["dtype"] in HALVES:
            gold_o, gold_g = run("reference", _ibm_module(c, torch.float32), torch.float32)
            _flash(go[1], wo[1], gold_o[1], "rate", k=2.0, eps_rel=1e-4)
            for i, (a, b, o) in enumerate(zip(gg, wg, gold_g)):
                _flash(a, b, o, f"grad {i}", k=2.0, eps_rel=1e-4)
            return
        tol = dict(rtol=1e-9, atol_rel=1e-11) if c["dtype"] == torch.float64 else dict(rtol=2e-4, atol_rel=2e-5)
        _close(go[1], wo[1], "rate", **tol)
        if c["dtype"] == torch.float64:
            for i, (a, b) in enumerate(zip(gg, wg)):
                _close(a, b, f"grad {i}", **tol)
            return
        gold_g = run("reference", _ibm_module(c, torch.float64), torch.float64)[1]
        for i, (a, b, o) in enumerate(zip(gg, wg, gold_g)):
            _flash(a, b, o, f"grad {i}", k=4.0, eps_rel=2e-5)

    _parity("valid", c, lambda: run("reference"), lambda: run(be), compare)


@pytest.mark.parametrize("be", KERNELS)
def test_ibm_parity(be):
    """The IBM module (train: masked noisy channel and rate; eval: identity) on each backend."""
    explicit = [dict(C=5, batch=3, spatial=(), dtype=torch.float32, rho=rho, s=s, training=True, seed=9,
                     offset=2**32 - 4, data=2, layout="contiguous", special="none", kind="valid")
                for rho, s in ((0.0, 1.0), (0.25, 0.5), (0.0, 3.0))]
    _run_property("ibm", be, ibm_cases(be), _check_ibm, explicit)


@st.composite
def ibm_bad_hparams(draw, be):
    name = draw(st.sampled_from(["rho", "s"]))
    bad = {"rho": [-0.1, 1.01, float("nan"), True], "s": [-1.0, -1e-3, 0.0, float("nan"), float("inf"), False]}
    return _Case(name=name, value=draw(st.sampled_from(bad[name])), C=draw(st.sampled_from([1, 4])),
                 data=draw(st.integers(0, 100)), kind="invalid")


def _check_ibm_bad(be, c):
    """A bad rho or s is rejected (ValueError, TypeError for a bool) by the constructor,
    whatever the backend, and by the functional op on each backend like the reference."""
    def construct(b):
        return IBM(c["C"], backend=b, **{c["name"]: c["value"]})
    _parity("invalid", c, lambda: construct("reference"), lambda: construct(be), lambda a, b: None)
    y = _values((3, c["C"]), c["data"], 2.0, "none", torch.float32)
    mats, biases, facs, _ = _eb_params(c["C"], c["data"])
    kw = dict(rho=0.0, s=1.0)
    kw[c["name"]] = c["value"]

    def op(b):
        return entropy_bottleneck(y, mats, biases, facs, mode="noise", seed=1, backend=b, **kw)
    _parity("invalid", c, lambda: op("reference"), lambda: op(be), lambda a, b: None)


@pytest.mark.parametrize("be", KERNELS)
def test_ibm_rejects_bad_hyperparameters(be):
    _run_property("ibm_bad_hparams", be, ibm_bad_hparams(be), _check_ibm_bad)


# ----------------------------------------------------------------------------- cifd_loss
@st.composite
def loss_cases(draw, be):
    tiny = be == "triton"
    c = _Case(M=draw(st.sampled_from([1, 2, 4] + ([] if tiny else [9]))),
              B=draw(st.sampled_from([1, 2, 3, 5] + ([] if tiny else [33, 130]))),
              K=draw(st.sampled_from([1, 2, 7, 10] + ([] if tiny else [37, 1000]))),
              D=draw(st.sampled_from([None, 1, 5] + ([] if tiny else [19, 100]))),
              dtype=draw(st.sampled_from([torch.float32] * 3 + list(HALVES))),
              dist=draw(st.sampled_from(loss_ref.DISTORTIONS)),
              p_drop=draw(st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0])),
              tau=draw(st.sampled_from([2.0, 1.0, 0.5]) | st.floats(0.1, 8.0)),
              lam=draw(st.sampled_from(["none", "list", "tensor"])),
              lam_ce=draw(st.sampled_from([1.0, 0.7, 0.0])), lam_kl=draw(st.sampled_from([1.0, 1.3, 0.0])),
              w_emb=draw(st.sampled_from([100.0, 2.5, 0.0])), rate=draw(st.sampled_from([None, "f32", "f64"])),
              lam_I=draw(st.sampled_from([0.005, 0.37])),
              labels=draw(st.sampled_from(["some", "some", "all", "none"])),
              seed=draw(SEEDS), offset=draw(st.integers(0, 2**40)), data=draw(st.integers(0, 2**16)),
              layout=draw(LAYOUTS), special=draw(st.sampled_from(["none"] * 6 + ["nan", "inf", "dropped_nan"])),
              kind="valid")
    if c["B"] * c["K"] * c["M"] > 40000:
        c["K"] = 37
    return c


def _loss_inputs(c):
    g = _gen(c["data"])
    M, B, K, D, dt = c["M"], c["B"], c["K"], c["D"], c["dtype"]
    z = 3 * torch.randn(B, K, generator=g, dtype=torch.float64)
    t = z[None] + 2 * torch.randn(M, B, K, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (B,), generator=g)
    if c["labels"] == "some" and B >= 2:
        y[1] = IGNORE  # ignore_index rows leave the CE mean
    elif c["labels"] == "none":
        y[:] = IGNORE
    u = torch.randn(B, D, generator=g, dtype=torch.float64) if D else None
    x = u[None] + 0.8 * torch.randn(M, B, D, generator=g, dtype=torch.float64) if D else None
    if c["special"] == "nan":
        z[0, 0] = float("nan")
    elif c["special"] == "inf":
        t[0, -1, 0] = float("inf")
    elif c["special"] == "dropped_nan":  # a dropped target is never read (reference rule)
        keep = loss_ref.kd_keep_flags(M, c["seed"], c["offset"], c["p_drop"])
        t[~keep] = float("nan")
        if x is not None:
            x[~keep] = float("inf")
    lam = [1.0] + [0.3 + 0.2 * i for i in range(M - 1)]
    lam = {"none": None, "list": lam, "tensor": torch.tensor(lam)}[c["lam"]]
    rate = None if c["rate"] is None else 5 * torch.rand(B, generator=g, dtype=torch.float64)
    g_out = torch.randn((), generator=g).item()
    lay = c["layout"]
    ins = dict(student_logits=_strided(z.to(dt), lay), target_logits=_strided(t.to(dt), lay), labels=y,
               student_emb=_strided(u.to(dt), lay) if D else None,
               target_embs=_strided(x.to(dt), lay) if D else None)
    return ins, lam, rate, g_out


def _loss_run(b, c, ins, lam, rate, g_out, grad=True, upcast=None):
    cast = (lambda v: v.detach().to(upcast)) if upcast is not None else (lambda v: v)
    z = _leaf(cast(ins["student_logits"]), grad)
    u = _leaf(cast(ins["student_emb"]), grad) if ins["student_emb"] is not None else None
    r = None
    if rate is not None:
        r = _leaf(rate.to(torch.float64 if c["rate"] == "f64" else torch.float32), grad)
    t = cast(ins["target_logits"])
    x = cast(ins["target_embs"]) if ins["target_embs"] is not None else None
    loss, terms = loss_ops.cifd_loss(z, t, ins["labels"], u, x, lam, tau=c["tau"], p_drop=c["p_drop"],
                                     seed=c["seed"], offset=c["offset"], lam_ce=c["lam_ce"], lam_kl=c["lam_kl"],
                                     w_emb=c["w_emb"], dist=c["dist"], ibm_rate=r, lam_I=c["lam_I"],
                                     ignore_index=IGNORE, backend=b)
    if not grad:
        return loss, terms, None
    wrt = [v for v in (z, u, r) if v is not None]
    gr = _grads([loss], [torch.tensor(g_out, dtype=loss.dtype)], wrt)
    return loss, terms, gr


TERMS = ("ce", "kl", "emb", "rate")


def _check_loss(be, c):
    ins, lam, rate, g_out = _loss_inputs(c)

    # A float64 ibm_rate makes the reference compute the loss and its terms in float64;
    # the kernels return them in float32 (documented): values compared, not dtypes.
    f32_terms = c["rate"] != "f64"

    def compare(got, want):
        _exact(got[1]["keep"], want[1]["keep"], "keep")  # the same Philox bits
        if c["dtype"] == torch.float32:
            _close(got[0], want[0], "loss", rtol=1e-5, atol_rel=1e-5, check_dtype=f32_terms)
            for k in TERMS:
                _close(got[1][k], want[1][k], k, rtol=1e-5, atol_rel=1e-5, check_dtype=f32_terms)
            for i, (a, b) in enumerate(zip(got[2], want[2])):
                _close(a, b, f"grad {i}", rtol=1e-4, atol_rel=1e-6)
            return
        exact = _loss_run("reference", c, ins, lam, rate, g_out, upcast=torch.float32)
        _flash(got[0], want[0], exact[0], "loss", k=2.0, eps_rel=1e-4, check_dtype=f32_terms)
        for k in TERMS:
            _flash(got[1][k], want[1][k], exact[1][k], k, k=2.0, eps_rel=1e-5, check_dtype=f32_terms)
        for i, (a, b, o) in enumerate(zip(got[2], want[2], exact[2])):
            _flash(a, b, o, f"grad {i}", k=2.0, eps_rel=1e-5)

    _parity(c["kind"], c, lambda: _loss_run("reference", c, ins, lam, rate, g_out),
            lambda: _loss_run(be, c, ins, lam, rate, g_out), compare)


@pytest.mark.parametrize("be", KERNELS)
def test_cifd_loss_parity(be):
    """Valid inputs: M targets, odd B/K/D, with and without embeddings and the IBM rate,
    both distortions, KD-dropout, ignored labels, lam forms, dtypes, strides, NaN/inf."""
    _run_property("cifd_loss", be, loss_cases(be), _check_loss)


@st.composite
def grouped_cases(draw, be):
    tiny = be == "triton"
    return _Case(G=draw(st.sampled_from([1, 2, 3] + ([] if tiny else [5]))), M=draw(st.sampled_from([1, 2, 4])),
                 B=draw(st.sampled_from([1, 3, 5] + ([] if tiny else [33]))),
                 K=draw(st.sampled_from([1, 7, 10] + ([] if tiny else [37, 1000]))),
                 D=draw(st.sampled_from([1, 5] + ([] if tiny else [19]))),
                 dtype=draw(st.sampled_from([torch.float32, torch.float32] + list(HALVES))),
                 dist=draw(st.sampled_from(loss_ref.DISTORTIONS)), tau=draw(st.sampled_from([2.0, 1.0, 0.7])),
                 lam_ce=draw(st.sampled_from([1.0, 0.7, 0.0])), lam_kl=draw(st.sampled_from([1.0, 1.3, 0.0])),
                 labels=draw(st.sampled_from(["some", "all", "none"])), data=draw(st.integers(0, 2**16)),
                 layout=draw(LAYOUTS), kind="valid")


def _check_grouped(be, c):
    """grouped_loss (the RDM bank's stage 1: G students against shared frozen targets,
    one kernel pass) equals G reference cifd_loss calls, each with w_emb = group_w[g]."""
    g = _gen(c["data"])
    G, M, B, K, D, dt = c["G"], c["M"], c["B"], c["K"], c["D"], c["dtype"]
    z = 3 * torch.randn(G, B, K, generator=g)
    t = 3 * torch.randn(M, B, K, generator=g)
    x = torch.randn(M, B, D, generator=g)
    u = x[:1] + 0.8 * torch.randn(G, B, D, generator=g)
    y = torch.randint(0, K, (B,), generator=g)
    if c["labels"] == "some":
        y[0] = IGNORE
    elif c["labels"] == "none":
        y[:] = IGNORE
    gw = torch.tensor([0.5 + 1.5 * i for i in range(G)])
    g_out = torch.randn(G, generator=g)
    kw = dict(tau=c["tau"], lam_ce=c["lam_ce"], lam_kl=c["lam_kl"], dist=c["dist"], ignore_index=IGNORE)
    lay = c["layout"]
    z, t, u, x = (_strided(v.to(dt), lay) for v in (z, t, u, x))

    def run_kernel(upcast=None):
        cast = (lambda v: v.to(upcast)) if upcast else (lambda v: v)
        zz, uu = _leaf(cast(z)), _leaf(cast(u))
        loss, ce, kl, emb = loss_ops.grouped_loss(zz, cast(t), y, uu, cast(x), gw, backend=be, **kw)
        return [loss, ce, kl, emb], _grads([loss], [g_out], [zz, uu])

    def run_ref(upcast=None):
        cast = (lambda v: v.to(upcast)) if upcast else (lambda v: v)
        zz, uu = _leaf(cast(z)), _leaf(cast(u))
        outs = [loss_ref.cifd_loss(zz[i], cast(t), y, uu[i], cast(x), [1.0] * M, p_drop=0.0, w_emb=float(gw[i]),
                                   **kw) for i in range(G)]
        loss = torch.stack([o[0] for o in outs])
        terms = [torch.stack([o[1]["ce"] for o in outs]), torch.stack([o[1]["kl"] for o in outs], 1),
                 torch.stack([o[1]["emb"] for o in outs], 1)]
        return [loss] + [v.detach() for v in terms], _grads([loss], [g_out.to(loss.dtype)], [zz, uu])

    names = ["loss", "ce", "kl", "emb", "grad z", "grad u"]

    def compare(got, want):
        a_all, b_all = got[0] + got[1], want[0] + want[1]
        if dt == torch.float32:
            for i, (name, a, b) in enumerate(zip(names, a_all, b_all)):
                _close(a, b, name, rtol=1e-4 if i >= 4 else 1e-5, atol_rel=1e-6 if i >= 4 else 1e-5)
            return
        ex = run_ref(torch.float32)
        for name, a, b, o in zip(names, a_all, b_all, ex[0] + ex[1]):
            _flash(a, b, o, name, k=2.0, eps_rel=1e-4 if name == "loss" else 1e-5)

    _parity("valid", c, run_ref, run_kernel, compare)


@pytest.mark.parametrize("be", KERNELS)
def test_cifd_loss_grouped_parity(be):
    _run_property("cifd_loss_grouped", be, grouped_cases(be), _check_grouped)


LOSS_BAD = ["logits_int", "labels_float", "logits_1d", "targets_2d", "K_mismatch", "B_mismatch", "M_zero",
            "emb_alone", "D_mismatch", "rate_shape", "empty_batch", "tau", "p_drop", "dist", "lam_length",
            "seed_negative", "labels_meta", "all_meta", "float64", "lam_negative", "weights_negative"]


@st.composite
def loss_bad_cases(draw, be, bad):
    c = draw(loss_cases(be))
    c.update(special="none", dtype=torch.float32)
    if c["D"] is None:
        c["D"] = 3
    c["bad"] = bad
    c["kind"] = {"all_meta": "device", "float64": "unsupported", "lam_negative": "either",
                 "weights_negative": "either"}.get(bad, "invalid")
    if bad == "tau":
        c["tau"] = draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf")]))
    elif bad == "p_drop":
        c["p_drop"] = draw(st.sampled_from([-0.1, 1.5, float("nan")]))
    elif bad == "dist":
        c["dist"] = draw(st.sampled_from(["l1", "MSE", ""]))
    elif bad == "seed_negative":
        c["seed"] = -1
    elif bad == "weights_negative":
        c[draw(st.sampled_from(["lam_ce", "lam_kl", "w_emb", "lam_I"]))] = -0.5
    return c


def _check_loss_bad(be, c):
    ins, lam, rate, _ = _loss_inputs(c)
    bad = c["bad"]
    z, t, y, u, x = (ins[k] for k in ("student_logits", "target_logits", "labels", "student_emb", "target_embs"))
    M, B = c["M"], c["B"]
    if bad == "logits_int":
        z = z.round().long()
    elif bad == "labels_float":
        y = y.float()
    elif bad == "logits_1d":
        z = z[0]
    elif bad == "targets_2d":
        t = t[0]
    elif bad == "K_mismatch":
        t = torch.cat([t, t[..., :1]], -1)
    elif bad == "B_mismatch":
        y = torch.cat([y, y[:1]])
    elif bad == "M_zero":
        t, x, lam = t[:0], x[:0], None
    elif bad == "emb_alone":
        x = None
    elif bad == "D_mismatch":
        x = torch.cat([x, x[..., :1]], -1)
    elif bad == "rate_shape":
        rate = torch.ones(B + 1, dtype=torch.float64)
    elif bad == "empty_batch":
        z, t, y, u, x = z[:0], t[:, :0], y[:0], u[:0], x[:, :0]
        rate = None
    elif bad == "lam_length":
        lam = [1.0] * (M + 1)
    elif bad == "lam_negative":
        lam = [-1.0] * M
    elif bad == "labels_meta":
        y = y.to("meta")
    elif bad == "all_meta":
        z, t, y, u, x = (v.to("meta") for v in (z, t, y, u, x))
        lam = None
        rate = None
    elif bad == "float64":
        z, t, u, x = (v.double() for v in (z, t, u, x))
    r = rate.float() if rate is not None and bad != "all_meta" else None

    def run(b):
        return loss_ops.cifd_loss(z, t, y, u, x, lam, tau=c["tau"], p_drop=c["p_drop"], seed=c["seed"],
                                  offset=c["offset"], lam_ce=c["lam_ce"], lam_kl=c["lam_kl"], w_emb=c["w_emb"],
                                  dist=c["dist"], ibm_rate=r, lam_I=c["lam_I"], ignore_index=IGNORE, backend=b)

    def compare(got, want):
        _close(got[0], want[0], "loss", rtol=1e-5, atol_rel=1e-5)

    kind = c["kind"]
    if kind == "device":
        kind = "unsupported" if _outcome(lambda: run("reference"))[1] is None else "invalid"
    _parity(kind, c, lambda: run("reference"), lambda: run(be), compare)


@pytest.mark.parametrize("bad", LOSS_BAD)
@pytest.mark.parametrize("be", KERNELS)
def test_cifd_loss_rejects_like_reference(be, bad):
    _run_property("cifd_loss_bad", be, loss_bad_cases(be, bad), _check_loss_bad, kind=bad)


@st.composite
def label_cases(draw, be):
    c = draw(loss_cases(be))
    c.update(special="none", dtype=torch.float32, kind="invalid",
             label=draw(st.sampled_from(["K", "K+5", "-1", "-2", "2**40"])))
    return c


def _check_labels(be, c):
    """An out-of-range label (not ignore_index) is an error on every backend, of the
    reference's type (torch's cross_entropy: IndexError on the CPU)."""
    ins, lam, rate, _ = _loss_inputs(c)
    y = ins["labels"].clone()
    y[-1] = eval(c["label"], {"K": c["K"]})  # noqa: S307 (a fixed table above)
    ins["labels"] = y

    def run(b):
        return loss_ops.cifd_loss(**ins, lam=lam, p_drop=c["p_drop"], seed=c["seed"], dist=c["dist"],
                                  ignore_index=IGNORE, backend=b)
    _parity("invalid", c, lambda: run("reference"), lambda: run(be), lambda a, b: None)


@pytest.mark.parametrize("be", KERNELS)
def test_cifd_loss_rejects_out_of_range_labels(be):
    _run_property("cifd_loss_labels", be, label_cases(be), _check_labels)


# ----------------------------------------------------------------------------- RDM bank
@st.composite
def bank_cases(draw, be):
    tiny = be == "triton"
    c = _Case(n=draw(st.sampled_from([1, 2, 3])), B=draw(st.sampled_from([1, 2, 5] + ([] if tiny else [9, 33]))),
              D=draw(st.sampled_from([3, 8] + ([] if tiny else [17]))),
              H=draw(st.sampled_from([4, 9] + ([] if tiny else [31]))), L=draw(st.sampled_from([1, 3, 5])),
              K=draw(st.sampled_from([2, 7] + ([] if tiny else [10, 101]))),
              R=draw(st.sampled_from([(1.0, 0.5, 2.0), (0.0, 3.0, 0.1), (1e3, 1.0, 1e-2)])),
              act=draw(st.sampled_from(["relu", "gelu"])), dist=draw(st.sampled_from(loss_ref.DISTORTIONS)),
              lam_ce=draw(st.sampled_from([1.0, 0.5])), lam_kl=draw(st.sampled_from([1.0, 0.7, 0.0])),
              tau=draw(st.sampled_from([2.0, 1.0])), teacher=draw(st.booleans()),
              labels=draw(st.sampled_from(["some", "some", "none", "absent"])),
              mode=draw(st.sampled_from(["train", "train", "eval", "frozen"])),
              dtype=draw(st.sampled_from([torch.float32] * 3 + list(HALVES))), seed=draw(SEEDS),
              offset=draw(st.integers(0, 2**40)), data=draw(st.integers(0, 2**16)), layout=draw(LAYOUTS),
              kind="valid")
    if c["dtype"] in HALVES and c["mode"] == "eval":
        c["mode"] = "frozen"
    if c["mode"] == "frozen" and draw(st.booleans()):
        c["B"] = 0  # the frozen targets of an empty batch are empty
    return c


@contextlib.contextmanager
def _global_seed(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _bank(c, dtype=torch.float32):
    with _global_seed(c["data"]):
        bank = RDMBank(c["n"], c["D"], c["H"], c["L"], c["K"], R=list(c["R"][:c["n"]]), act=c["act"],
                       dist=c["dist"], lam_ce=c["lam_ce"], lam_kl=c["lam_kl"], tau=c["tau"])
    g = _gen(c["data"] + 1)
    with torch.no_grad():
        for p in bank.entropy_bottleneck.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return bank.to(dtype).train(c["mode"] == "train")


def _bank_inputs(c):
    g = _gen(c["data"] + 2)
    x = 2 * torch.randn(c["B"], c["D"], generator=g)
    t = 3 * torch.randn(c["B"], c["K"], generator=g) if c["teacher"] else None
    y = torch.randint(0, c["K"], (c["B"],), generator=g)
    if c["labels"] == "some" and c["B"] > 1:
        y[0] = IGNORE
    elif c["labels"] == "none":
        y[:] = IGNORE
    y = None if c["labels"] == "absent" else y
    return x, t, y


def _bank_run(b, c, bank, x, t, y, per_head=False):
    """(outputs, gradients of every parameter) of the bank on backend ``b``: train mode with
    random weights on x_hat, logits, rate and the loss; eval and frozen without a graph.
    ``per_head`` appends, per parameter, the sum over the four heads of the magnitude of
    that head's gradient (the size of the terms the gradient sums)."""
    bank = copy.deepcopy(bank)
    bank.backend = b
    dt = next(bank.parameters()).dtype
    x = _strided(x.to(dt), c["layout"])
    t = _strided(t.to(dt), c["layout"]) if t is not None else None
    none = ([], []) if per_head else ([],)
    if c["mode"] == "frozen":
        return (list(bank.frozen_targets(x)),) + none
    out = bank(x, t, y, seed=c["seed"], offset=c["offset"])
    outs = [out.x_hat, out.logits, out.rate, out.likelihoods, out.loss] + \
        [out.terms[k] for k in ("dist", "rate", "ce", "kl", "loss")]
    if c["mode"] != "train":
        return (outs,) + none
    g = _gen(c["data"] + 3)
    heads = [out.x_hat, out.logits, out.rate, out.loss]
    gs = [torch.randn(h.shape, generator=g).to(h.dtype) for h in heads]
    params = [p for name, p in bank.named_parameters() if name != "entropy_bottleneck.quantiles"]
    if not per_head:
        return outs, _grads(heads, gs, params)
    size = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for h, gh in zip(heads, gs):
        for s, v in zip(size, torch.autograd.grad(h, params, gh, retain_graph=True, allow_unused=True)):
            if v is not None:
                s += v.double().abs()
    return outs, _grads(heads, gs, params), size


def _half_bank_eager(c, bank, x, t, y):
    """The flash-attention rule's "reference in low precision" for a half bank: ATen GEMMs
    and activations in the parameters' dtype, the reference channel, rate and loss in
    float32 on dtype-rounded values (test_rdm_bank.py's rule)."""
    bank = copy.deepcopy(bank)
    dt = next(bank.parameters()).dtype
    p = {f"{layer}.{k}": getattr(getattr(bank, layer), k) for layer in rdm_ref.LAYERS for k in ("weight", "bias")}
    eb = bank.entropy_bottleneck
    x = x.to(dt)
    t = t.to(dt) if t is not None else None

    def lin(h, layer, act="none"):
        return bank_ops.rdm_linear(h, p[f"{layer}.weight"], p[f"{layer}.bias"], act, backend="reference")
    z = lin(lin(x, "enc1", c["act"]), "enc2")
    frozen = c["mode"] == "frozen"
    med = eb.medians().detach().float() if frozen else None
    z_hat = rdm_ref.quantize_latent(z.float(), "dequantize" if frozen else "noise", c["seed"], c["offset"],
                                    med).to(dt)
    x_hat = lin(lin(z_hat, "dec1", c["act"]), "dec2")
    logits = lin(x_hat, "head")
    if frozen:
        return [x_hat, logits], []
    f32 = lambda ts: [v.float() for v in ts]  # noqa: E731
    lik = rdm_ref.latent_likelihood(z_hat.float(), f32(eb.matrices), f32(eb.biases), f32(eb.factors),
                                    eb.likelihood_bound)
    rate = eb_ref.rate_nats(lik.reshape(-1, c["L"])).reshape(c["n"], -1)
    loss, terms = rdm_ref.rdm_bank_loss(x, x_hat, logits, rate, list(bank.R), y, t, dist=c["dist"],
                                        lam_ce=c["lam_ce"], lam_kl=c["lam_kl"], tau=c["tau"], ignore_index=IGNORE)
    outs = [x_hat, logits, rate, lik, loss] + [terms[k] for k in ("dist", "rate", "ce", "kl", "loss")]
    g = _gen(c["data"] + 3)
    heads = [x_hat, logits, rate, loss]
    gs = [torch.randn(h.shape, generator=g).to(h.dtype) for h in heads]
    params = [v for name, v in bank.named_parameters() if name != "entropy_bottleneck.quantiles"]
    return outs, _grads(heads, gs, params)


BANK_NAMES = ["x_hat", "logits", "rate", "likelihoods", "loss", "terms.dist", "terms.rate", "terms.ce",
              "terms.kl", "terms.loss"]


def _check_bank(be, c):
    bank = _bank(c, c["dtype"])
    x, t, y = _bank_inputs(c)

    def compare(got, want):
        (go, gg), (wo, wg) = got, want
        assert len(go) == len(wo) and len(gg) == len(wg)
        if c["dtype"] == torch.float32:
            for name, a, b in zip(BANK_NAMES, go, wo):
                assert (a is None) == (b is None), f"{name} returned on one side only"
                if a is not None:
                    _close(a, b, name, rtol=2e-4, atol_rel=2e-5)
            for i, (a, b) in enumerate(zip(gg, wg)):
                # parameter gradients sum over the batch: the floor scales with their size
                _close(a, b, f"grad {i}", rtol=2e-4, atol_rel=2e-5)
            return
        exact = _bank_run("reference", c, _bank(c, torch.float32), x, t, y, per_head=True)
        lo = _half_bank_eager(c, bank, x, t, y)
        # test_rdm_bank.py's floor, 1e-3 of the largest entry, is below one bfloat16 ulp
        # (2^-7) there: the GEMMs round every hidden value to the dtype, so the floor is
        # one ulp of the dtype at the output's scale where that is larger.
        eps = max(1e-3, torch.finfo(c["dtype"]).eps)
        for name, a, b, o in zip(BANK_NAMES, go, lo[0], exact[0]):
            if a is not None:
                _flash(a, b, o, name, k=2.0, eps_rel=eps)
        # A parameter's gradient sums the four heads' contributions, each rounded to the
        # half dtype on both paths (at different points: the fused loss kernel writes half
        # gradients, the eager bank casts the reference's float32 ones), where they may
        # cancel: two ulps of the summed contributions' size.
        for i, (a, b, o, size) in enumerate(zip(gg, lo[1], exact[1], exact[2])):
            _flash(a, b, o, f"grad {i}", k=2.0, eps_rel=eps, ulps=2.0, ulp_of=size)

    _parity("valid", c, lambda: _bank_run("reference", c, bank, x, t, y), lambda: _bank_run(be, c, bank, x, t, y),
            compare)


@pytest.mark.parametrize("be", KERNELS)
def test_rdm_bank_parity(be):
    """The RDM bank module: training (noisy channel, stage-1 losses, every parameter's
    gradient), eval and frozen targets; N RDMs, odd widths, both activations and
    distortions, labels or teacher left out, dtypes, strided inputs."""
    _run_property("rdm_bank", be, bank_cases(be), _check_bank)


BANK_BAD = ["x_int", "x_1d", "x_D", "labels_float", "labels_B", "labels_range", "teacher_K", "teacher_B",
            "empty_batch", "seed_negative", "x_meta", "float64", "R_negative_functional"]


@st.composite
def bank_bad_cases(draw, be, bad):
    c = draw(bank_cases(be))
    c.update(dtype=torch.float32, mode=draw(st.sampled_from(["train", "eval"])), B=max(c["B"], 2), teacher=True,
             labels="some")
    c["bad"] = bad
    c["kind"] = {"float64": "unsupported", "R_negative_functional": "either"}.get(bad, "invalid")
    if bad in ("float64", "labels_range"):
        c["mode"] = "train"
    return c


def _check_bank_bad(be, c):
    bank = _bank(c)
    x, t, y = _bank_inputs(c)
    bad = c["bad"]
    if bad == "x_int":
        x = x.round().int()
    elif bad == "x_1d":
        x = x[0]
    elif bad == "x_D":
        x = torch.cat([x, x[:, :1]], 1)
    elif bad == "labels_float":
        y = y.float()
    elif bad == "labels_B":
        y = y[1:]
    elif bad == "labels_range":  # an out-of-range label (not ignore_index): torch's IndexError
        y = y.clone()
        y[-1] = c["K"] if c["data"] % 2 else -1
    elif bad == "teacher_K":
        t = torch.cat([t, t[:, :1]], 1)
    elif bad == "teacher_B":
        t = t[1:]
    elif bad == "empty_batch":
        x, t, y = x[:0], t[:0], y[:0]
    elif bad == "x_meta":
        x = x.to("meta")
    elif bad == "float64":
        bank = bank.double()
        x, t = x.double(), t.double()
    seed = -1 if bad == "seed_negative" else c["seed"]

    def run(b):
        m = copy.deepcopy(bank)
        m.backend = b
        if bad == "R_negative_functional":
            out = bank_ops.rdm_bank_forward(x, {k: v for k, v in m.state_dict().items() if "." in k and
                                                k.split(".")[0] in rdm_ref.LAYERS},
                                            list(m.entropy_bottleneck.matrices), list(m.entropy_bottleneck.biases),
                                            list(m.entropy_bottleneck.factors), seed=seed, backend=b)
            loss, _ = bank_ops.rdm_bank_loss(x, out.x_hat, out.logits, out.rate, [-1.0] * c["n"], y, t, backend=b)
            return loss
        if bad == "seed_negative":
            m.train()
        return m(x, t, y, seed=seed, offset=c["offset"]).loss

    def compare(got, want):
        _close(got, want, "loss", rtol=2e-4, atol_rel=2e-5)
    _parity(c["kind"], c, lambda: run("reference"), lambda: run(be), compare)


@pytest.mark.parametrize("bad", BANK_BAD)
@pytest.mark.parametrize("be", KERNELS)
def test_rdm_bank_rejects_like_reference(be, bad):
    _run_property("rdm_bank_bad", be, bank_bad_cases(be, bad), _check_bank_bad, kind=bad)


BANK_HPARAMS = ["R", "tau", "act", "dist", "lam_ce", "lam_kl", "R_length", "R_type"]


@st.composite
def bank_bad_hparams(draw, be, name):
    value = {"R": draw(st.sampled_from([-1.0, -1e-6, float("nan"), float("inf")])),
             "tau": draw(st.sampled_from([0.0, -2.0, float("nan")])), "act": "tanh", "dist": "l2",
             "lam_ce": -1.0, "lam_kl": float("nan"), "R_length": None, "R_type": True}[name]
    return _Case(name=name, value=value, n=draw(st.sampled_from([1, 3])), kind="invalid")


def _check_bank_bad_hparams(be, c):
    """RDMBank's constructor rejects bad hyperparameters (ValueError; TypeError for a bool
    weight), whatever the backend: each weight R_n finite and >= 0, tau > 0, the names."""
    def construct(b):
        kw = dict(R=[1.0] * c["n"], backend=b)
        if c["name"] == "R":
            kw["R"] = [1.0] * (c["n"] - 1) + [c["value"]]
        elif c["name"] == "R_length":
            kw["R"] = [1.0] * (c["n"] + 1)
        elif c["name"] == "R_type":
            kw["R"] = [1.0] * (c["n"] - 1) + [True]
        else:
            kw[c["name"]] = c["value"]
        return RDMBank(c["n"], 4, 5, 3, 6, **kw)
    _parity("invalid", c, lambda: construct("reference"), lambda: construct(be), lambda a, b: None)


@pytest.mark.parametrize("name", BANK_HPARAMS)
@pytest.mark.parametrize("be", KERNELS)
def test_rdm_bank_rejects_bad_hyperparameters(be, name):
    _run_property("rdm_bank_bad_hparams", be, bank_bad_hparams(be, name), _check_bank_bad_hparams, kind=name)


# ----------------------------------------------------------------------------- the count
def test_total_case_count():
    """Runs last (file order): the properties above ran at least CASE_FLOOR cases in all."""
    kinds = {"entropy_bottleneck_bad": EB_BAD_PARAMS,
             "cifd_loss_bad": [(be, k) for be in KERNELS for k in LOSS_BAD],
             "rdm_bank_bad": [(be, k) for be in KERNELS for k in BANK_BAD],
             "rdm_bank_bad_hparams": [(be, k) for be in KERNELS for k in BANK_HPARAMS]}
    expected = {f"{name}[{be}]" for name in EXAMPLES if name not in kinds for be in KERNELS}
    expected |= {f"{name}[{be}-{k}]" for name, pairs in kinds.items() for be, k in pairs}
    ran = {k for k in COUNTS if COUNTS[k] > 0}
    total = sum(COUNTS.values())
    print(f"\nparity cases run: {total} ({dict(sorted(COUNTS.items()))})")
    if ran != expected:
        pytest.skip(f"only {len(ran)} of {len(expected)} properties ran here ({total} cases)")
    assert total >= CASE_FLOOR, f"{total} parity cases ran, fewer than {CASE_FLOOR}"
