# SPDX-License-Identifier: Apache-2.0
"""``cifd::entropy_bottleneck``: the fused rate term (docs/METHOD.md sections 1, 3),
one op for the RDM bottleneck and the IBM alike.

Forward: ``y`` [N, C, *spatial] -> ``y_hat`` (input dtype), per-sample rate in
nats [N] (float32) and, on request, per-element likelihoods (float32). Backward:
gradients to ``y``, to every density parameter and to the medians, recomputing
the noise and masks from (seed, offset) and the density MLP from ``y``: nothing
of size [N, C] is saved but ``y``.

Backends: ``triton`` and ``cuda`` on GPU tensors, ``cpu`` (C++) on CPU tensors,
``reference`` anywhere. The kernels take the fast path ``filters=(3, 3, 3, 3)``
and float32/float16/bfloat16 inputs, the ``cpu`` kernel float64 ``y`` too (a
scalar float64 path, for gradcheck); ``auto`` sends anything else (other
filters, float64 on a GPU, float64 parameters with a lower-precision ``y``) to
the reference, an explicit kernel backend raises.

Routes: the reference, or the resolved kernel backend. ``cpu`` and ``cuda`` take
one op with C++ autograd, eagerly and under ``torch.compile`` alike
(``cifd_C::entropy_bottleneck_fused``: it packs the density parameters into
[58, C], see :mod:`.density_pack`, and unpacks the packed gradient). ``triton``
packs through :func:`.density_pack.pack_density` (the same C++ pair in one
autograd node) and runs its kernels through one autograd.Function eagerly, the
registered ops under tracing.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import torch

from .. import backend as _backend
from ..reference import _checks
from ..reference import entropy_bottleneck as _ref
from ..reference import ibm as _ref_ibm
from ..reference.philox import check_seed_offset, seed_value
from . import _eager
from . import density_pack as _pack

OP = "entropy_bottleneck"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class EntropyBottleneckOutput(NamedTuple):
    y_hat: torch.Tensor  # y's dtype and shape
    rate: torch.Tensor  # [N] float32, nats, over kept elements
    likelihood: Optional[torch.Tensor]  # float32 in y's shape, or None


def _triton():
    from .._triton import entropy_bottleneck as m
    return m


# ----------------------------------------------------------------------------- Triton
# The C++ backends (cpu, cuda) have one op, cifd_C::entropy_bottleneck_fused, with its
# autograd in C++ (see the end of this file). The Triton kernels are registered here,
# twice, over the same launchers and the same backward formula:
# * cifd::entropy_bottleneck_triton (torch.library.triton_op): what torch.compile traces
#   for an int seed; it traces into the launcher and sees the kernels (wrap_triton).
# * cifd::entropy_bottleneck (custom op): for a seed tensor (a module's seed drawn in the
#   graph), which the op reads where it runs. (The kernels take the seed as an int; a
#   seed pointer would let the triton_op take both, once a GPU can validate it.)
# Eagerly, one autograd.Function runs the same implementation and backward without
# custom-op dispatch (ops/_eager.py). (Under TRITON_INTERPRET=1 all of them run on the
# CPU; inside torch.compile the triton_op needs a GPU: fake tensors have no data.)
def _fwd_impl(y: torch.Tensor, packed: torch.Tensor, medians: Optional[torch.Tensor], mode: str,
              seed: int, offset: int, rho: float, s: float, bound: float, need_likelihood: bool,
              groups: int, seed_tensor: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Triton reduces through per-program partials: deterministic whatever the argument.
    seed = _seed(seed, seed_tensor, offset, y.numel())
    y_hat, rate, lik = _triton().entropy_bottleneck_fwd(
        y, packed, medians, mode, seed, offset, rho, s, bound, need_likelihood, groups=groups or None)
    if lik is None:
        lik = y.new_empty((0,), dtype=torch.float32)
    return y_hat, rate, lik


def _bwd_impl(y: torch.Tensor, packed: torch.Tensor, medians: Optional[torch.Tensor],
              grad_y_hat: Optional[torch.Tensor], grad_rate: Optional[torch.Tensor],
              grad_likelihood: Optional[torch.Tensor], mode: str, seed: int, offset: int, rho: float,
              s: float, bound: float, groups: int, seed_tensor: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    seed = _seed(seed, seed_tensor, offset, y.numel())
    grad_y, gp, gmed = _triton().entropy_bottleneck_bwd(
        y, packed, medians, grad_y_hat, grad_rate, grad_likelihood, mode, seed, offset, rho, s, bound,
        groups=groups or None)
    row = gmed if gmed is not None else gp.new_zeros(gp.shape[1])
    return grad_y, torch.cat([gp, row[None]], 0)


def _seed(seed: int, seed_tensor: Optional[torch.Tensor], offset: int, numel: int) -> int:
    """The call's seed: ``seed``, or the value of ``seed_tensor`` (a 0-dim int64 CPU tensor,
    the seed a traced module drew in its graph: read here, at run time, on the host)."""
    if seed_tensor is None:
        return seed
    seed = seed_value(seed_tensor)
    check_seed_offset(seed, offset, numel)
    return seed


def _fake_fwd(y, packed, medians, mode, seed, offset, rho, s, bound, need_likelihood, groups=0,
              seed_tensor=None):
    # cifd::entropy_bottleneck's and cifd_C::entropy_bottleneck_fwd's
    return _fake_outputs(y, need_likelihood, groups)


def _fake_outputs(y, need_likelihood, groups):
    cdt = torch.float64 if y.dtype == torch.float64 else torch.float32  # the compute dtype
    lik_shape = y.shape if need_likelihood else (0,)
    return (torch.empty_like(y), y.new_empty(tuple(y.shape[:2 if groups else 1]), dtype=cdt),
            y.new_empty(lik_shape, dtype=cdt))


def _fake_bwd(y, packed, *rest):
    return torch.empty_like(y), packed.new_empty((_pack.NUM_GRAD, packed.shape[1]))


_fwd_op = torch.library.custom_op("cifd::entropy_bottleneck", mutates_args=())(_fwd_impl)
_fwd_op.register_fake(_fake_fwd)
_bwd_op = torch.library.custom_op("cifd::entropy_bottleneck_bwd", mutates_args=())(_bwd_impl)
_bwd_op.register_fake(_fake_bwd)


@torch.library.triton_op("cifd::entropy_bottleneck_triton", mutates_args=())
def _fwd_triton(y: torch.Tensor, packed: torch.Tensor, medians: Optional[torch.Tensor], mode: str,
                seed: int, offset: int, rho: float, s: float, bound: float, need_likelihood: bool,
                groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(y, packed, medians, mode, seed, offset, rho, s, bound, need_likelihood, groups)


@torch.library.triton_op("cifd::entropy_bottleneck_triton_bwd", mutates_args=())
def _bwd_triton(y: torch.Tensor, packed: torch.Tensor, medians: Optional[torch.Tensor],
                grad_y_hat: Optional[torch.Tensor], grad_rate: Optional[torch.Tensor],
                grad_likelihood: Optional[torch.Tensor], mode: str, seed: int, offset: int, rho: float,
                s: float, bound: float, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd_impl(y, packed, medians, grad_y_hat, grad_rate, grad_likelihood, mode, seed, offset,
                     rho, s, bound, groups)


def _saves_y_hat(mode: str, rho: float, s: float, dtype: torch.dtype) -> bool:
    """Whether backward re-evaluates the density at the saved y_hat in mode ``none``
    instead of at y. In noise mode without masking and with float32/float64 y, y_hat
    *is* y + s u at the precision the kernels evaluate the density at, and
    d y_hat / d y = 1: the same bits without regenerating the noise (Philox is ~11% of
    the CPU backward: 60.7 -> 54.2 ms at (4096, 512)). Half-precision y_hat is
    rounded, rho > 0 needs the keep flags, and s != 1 reads the density at y_hat / s:
    those keep y and the noise mode."""
    return (_backend.get_kernel_options().save_y_hat and mode == "noise" and rho == 0.0 and s == 1.0
            and dtype in (torch.float32, torch.float64))


def _setup_context(ctx, inputs, output):
    # inputs: (y, packed, medians, mode, seed, offset, rho, s, bound, need_likelihood, groups)
    # and, for cifd::entropy_bottleneck, seed_tensor
    y, packed, medians, mode, seed, offset, rho, s, bound, need_lik = inputs[:10]
    saved, bwd_mode = (output[0], "none") if _saves_y_hat(mode, rho, s, y.dtype) else (y, mode)
    ctx.save_for_backward(saved, packed, medians)
    ctx.args = (bwd_mode, seed, offset, rho, s, bound) + tuple(inputs[10:])
    ctx.need_lik = need_lik


def _backward_via(bwd):
    """The backward formula over ``bwd``: the backward op (registered autograd, seen by
    tracing) or its implementation (the eager Function)."""
    def backward(ctx, g_y_hat, g_rate, g_lik):
        y, packed, medians = ctx.saved_tensors
        grad_y, gp = bwd(y, packed, medians, g_y_hat, g_rate, g_lik if ctx.need_lik else None, *ctx.args)
        g_med = gp[_pack.MEDIAN_ROW] if medians is not None else None
        return (grad_y, gp[:_pack.NUM_PACKED], g_med) + (None,) * (1 + len(ctx.args))  # need_lik, args
    return backward


_fwd_op.register_autograd(_backward_via(_bwd_op), setup_context=_setup_context)
_fwd_triton.register_autograd(_backward_via(_bwd_triton), setup_context=_setup_context)
# Unused outputs get zero gradients on both routes (materialize_grads), as the registered
# ops' autograd gives them: the same Triton backward specialization either way (with None
# on one route and zeros on the other, the H200 gave different bits, 2026-12-04).
_EagerFunction = _eager.autograd_function("EntropyBottleneckFunction", _fwd_impl, _setup_context,
                                         _backward_via(_bwd_impl), materialize_grads=True)


def _run_triton(y: torch.Tensor, packed: torch.Tensor, medians: Optional[torch.Tensor], mode: str, seed,
                offset: int, rho: float, s: float, bound: float, need_likelihood: bool, groups: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernels: ``(y_hat, rate, likelihood or empty)``. Checked arguments only;
    ``seed`` an int, or under tracing a seed tensor."""
    if not _eager.via_ops(y):  # eager: the same impl and backward, without custom-op dispatch
        return _EagerFunction.apply(y, packed, medians, mode, seed, offset, rho, s, bound,
                                    need_likelihood, groups)
    if isinstance(seed, torch.Tensor):  # drawn in the graph: the op reads it where it runs
        return _fwd_op(y, packed, medians, mode, 0, offset, rho, s, bound, need_likelihood, groups, seed)
    return _fwd_triton(y, packed, medians, mode, seed, offset, rho, s, bound, need_likelihood, groups)


# ----------------------------------------------------------------------------- public functional
def _kernel_ok(y, matrices, backend: str) -> bool:
    """Whether the ``backend`` kernel takes these inputs: the fast-path filters, and
    float32/float16/bfloat16 everywhere (with no float64 parameter, which would make
    the reference compute in float64), or float64 ``y`` on the ``cpu`` kernel."""
    if not _pack.supports(matrices):
        return False
    if y.dtype == torch.float64:
        return backend == "cpu"
    return y.dtype in _KERNEL_DTYPES and all(m.dtype != torch.float64 for m in matrices)


def entropy_bottleneck(y: torch.Tensor, matrices: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                       factors: Sequence[torch.Tensor], medians: Optional[torch.Tensor] = None,
                       mode: str = "noise", seed: int = 0, offset: int = 0, rho: float = 0.0,
                       s: float = 1.0, bound: float = 1e-9, need_likelihood: bool = False,
                       deterministic: bool = False, backend: Optional[str] = None,
                       groups: Optional[int] = None, _name: str = "y") -> EntropyBottleneckOutput:
    """Fused factorized entropy bottleneck.

    Args:
        y: [N, C, *spatial] (or [N, C]); float32/float16/bfloat16 on the kernels (any
            float on the reference). Any strides; element i of y's row-major order
            uses Philox counter ``offset + i``.
        matrices, biases, factors: CompressAI-layout density parameters.
        medians: [C], needed by ``mode="dequantize"`` (gets a gradient).
        mode: ``"noise"`` (training: ``y_hat = keep * (y + s*u)``, u ~ U(-1/2, 1/2) from
            Philox word 0, keep = U(word 1) >= rho), ``"dequantize"``
            (``round(y - m) + m``), ``"none"`` (``y_hat = y``).
        seed, offset: Python ints in [0, 2**63). The call uses counters
            ``offset .. offset + y.numel() - 1``. ``seed`` may also be a 0-dim int64 CPU
            tensor (what the modules draw under ``torch.compile``): read on the host where
            the kernels launch (eagerly: at once), never a device sync; the reference
            computes with it as a tensor.
        rho, s: IBM mask ratio and noise width (noise mode only); rho=0, s=1 is the
            RDM bottleneck. With s != 1 the density is read at ``y_hat / s`` (the unit
            channel's rate of ``y / s``, docs/METHOD.md section 3); likelihoods too.
        bound: likelihood floor (CompressAI's LowerBound rule in backward).
        need_likelihood: also return per-element likelihoods.
        deterministic: kernels reduce parameter gradients without float atomics (the
            ``triton`` kernels always do).
        backend: ``auto|cuda|triton|cpu|reference`` (default ``$CIFD_BACKEND``/auto).
        groups: G independent problems in one call (the RDM bank's N latents): y
            [G, N, C/G, *spatial], group g the problem ``y[g]`` on channels
            ``g C/G .. (g + 1) C/G - 1`` of the density (medians alike), every element
            at Philox counter ``offset`` + its flat index in y: the bits of G calls on
            the groups with offsets ``offset + g y[g].numel()``. Rate [G, N]. The
            ``triton`` kernels take groups without spatial dims (y [G, N, C/G]).

    Returns:
        ``EntropyBottleneckOutput(y_hat, rate, likelihood)``: y_hat in y's dtype and
        shape; rate [N] ([G, N] with groups) float32 in nats (-sum of ln p over kept
        elements; bits = / ln 2); likelihood float32 in y's shape, or None.
    """
    if not isinstance(y, torch.Tensor):  # _name: y's name in messages (the IBM's w)
        raise TypeError(f"{_name} must be a torch.Tensor, got {type(y).__name__}")
    if mode not in _pack.MODES:
        raise ValueError(f"mode must be one of {tuple(_pack.MODES)}, got {mode!r}")
    # The reference's argument checks first, so that every backend rejects what it rejects
    # with the same exception (a wrong dtype or device is not a missing backend).
    C = _ref.check_params(matrices, biases, factors)
    if groups is None:
        _ref.check_activation(_name, y, C, matrices[0].device)
    else:
        _check_groups(y, groups, C, matrices[0].device)
    _checks.check_rho_s(rho, s)
    _checks.check_finite("bound", bound)
    if mode == "dequantize":
        _ref.check_medians(medians, C, y.device)
    if mode != "noise":  # seed and offset are unused there, as in the reference
        seed, offset = 0, 0
    else:
        seed = _eager.eager_seed(seed, y)

    def why_not(be: str) -> Optional[str]:
        if groups is not None and be == "triton" and y.dim() > 3:
            return f"groups with y [G, N, C] (no spatial dims), got shape {tuple(y.shape)}"
        if _kernel_ok(y, matrices, be):
            return None
        dtypes = "float32/float16/bfloat16" + (" (or float64 y)" if be == "cpu" else "")
        return (f"filters=(3, 3, 3, 3) and {dtypes} inputs, got y {y.dtype} and filters "
                f"{tuple(int(m.shape[1]) for m in matrices[:-1])}")

    be = _backend.resolve_kernel(OP, backend, y.device, why_not)
    if be == "reference":
        if groups is not None:
            return _reference_groups(y, matrices, biases, factors, medians, mode, seed, offset, rho, s,
                                     bound, need_likelihood, groups)
        return _reference(y, matrices, biases, factors, medians, mode, seed, offset, rho, s, bound,
                          need_likelihood)
    cdt = torch.float64 if y.dtype == torch.float64 else torch.float32  # the kernels' compute dtype
    med = medians.to(cdt).contiguous() if mode == "dequantize" else None
    check_seed_offset(seed, offset, y.numel())
    if be == "triton":
        packed = _pack.pack_density(matrices, biases, factors, dtype=cdt)
        y_hat, rate, lik = _run_triton(y.contiguous(), packed, med, mode, seed, offset, float(rho),
                                       float(s), float(bound), bool(need_likelihood), int(groups or 0))
    else:  # cpu, cuda: the C++ op, its seed an int or (drawn in a traced graph) a tensor
        seed, seed_tensor = (0, seed) if isinstance(seed, torch.Tensor) else (seed, None)
        y_hat, rate, lik = _cpp_op()(
            y.contiguous(), _pack._flat(matrices, biases, factors), med, _pack.MODES[mode], seed, offset,
            float(rho), float(s), float(bound), bool(need_likelihood), bool(deterministic),
            _saves_y_hat(mode, rho, s, y.dtype), int(groups or 0), seed_tensor)
    return EntropyBottleneckOutput(y_hat, rate, lik if need_likelihood else None)


# The "cpu" and "cuda" backends: cifd_C::entropy_bottleneck_fused
# (python/entropy_bottleneck_fused.cpp), density packing, the kernels and both backward
# steps in one op whose autograd is C++: chosen by measurement over a Python
# autograd.Function around the same kernels and over the registered custom ops
# (benchmarks/NOTES.md, session 12: 0.59-0.67 ms against 0.78-0.81 and 1.08-1.33 ms for
# the IBM's fwd+bwd at [128, 32]). Eagerly and under tracing alike: its sub-ops have fake
# kernels (registered by the first lookup), so torch.compile and make_fx trace through
# its C++ autograd, and the traced step runs the eager step's ops and backward.
def _cpp_op():
    """``torch.ops.cifd_C.entropy_bottleneck_fused``; the first eager lookup registers the
    fakes (while compiling, :func:`_has_cpp_op` has run outside the graph)."""
    if torch.compiler.is_compiling():
        _has_cpp_op()
        return torch.ops.cifd_C.entropy_bottleneck_fused
    return _fused_op()


@torch.compiler.assume_constant_result
def _has_cpp_op() -> bool:
    return _fused_op() is not None


@functools.lru_cache(maxsize=None)
def _fused_op():
    """``torch.ops.cifd_C.entropy_bottleneck_fused``, or None for a ``_C`` without it. The
    first lookup registers the fake kernels of it and of the ops it calls."""
    if not _backend.has_ext_op("entropy_bottleneck_fused"):
        return None
    _pack.cpp_devices()  # registers density_pack's fakes
    torch.library.register_fake("cifd_C::entropy_bottleneck_fwd")(_fake_fwd)
    torch.library.register_fake("cifd_C::entropy_bottleneck_bwd")(_fake_bwd)
    torch.library.register_fake("cifd_C::entropy_bottleneck_fused")(
        lambda y, params, medians, mode, seed, offset, rho, s, bound, need_likelihood, deterministic,
        save_y_hat, groups=0, seed_tensor=None: _fake_outputs(y, need_likelihood, groups))
    return torch.ops.cifd_C.entropy_bottleneck_fused


def _check_groups(y, groups, C: int, device) -> None:
    """``groups`` a positive int and ``y`` [groups, N, C / groups, *spatial] on ``device``."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if y.dim() < 3 or y.shape[0] != groups or y.shape[2] * groups != C:
        raise ValueError(f"y must be [groups, N, C / groups, *spatial] = [{groups}, N, {C / groups:g}, "
                         f"...] for groups={groups} and C={C} channels, got shape {tuple(y.shape)}")
    _ref.check_activation("y[0]", y[0], C // groups, device)


def _reference_groups(y, matrices, biases, factors, medians, mode, seed, offset, rho, s, bound, need_lik,
                      groups):
    """The reference on each group: its channel slice of the density, its counters."""
    cg, per = y.shape[2], y[0].numel()
    outs = []
    for g in range(groups):
        ch = slice(g * cg, (g + 1) * cg)
        outs.append(_reference(y[g], [m[ch] for m in matrices], [b[ch] for b in biases],
                               [f[ch] for f in factors], medians[ch] if medians is not None else None,
                               mode, seed, offset + g * per if mode == "noise" else offset, rho, s, bound,
                               need_lik))
    return EntropyBottleneckOutput(*(torch.stack(t) if t[0] is not None else None for t in zip(*outs)))


def _reference(y, matrices, biases, factors, medians, mode, seed, offset, rho, s, bound, need_lik):
    if mode == "noise" and (rho != 0.0 or s != 1.0):
        y_hat, rate, _ = _ref_ibm.ibm(y, matrices, biases, factors, rho=rho, s=s, seed=seed,
                                      offset=offset, training=True, bound=bound)
        lik = _ref.likelihood(y_hat if s == 1.0 else y_hat.to(rate.dtype) / s, matrices, biases, factors,
                              bound=bound) if need_lik else None
        return EntropyBottleneckOutput(y_hat, rate, lik)
    y_hat, lik = _ref.entropy_bottleneck(y, matrices, biases, factors, medians, mode=mode, seed=seed,
                                         offset=offset, bound=bound)
    return EntropyBottleneckOutput(y_hat, _ref.rate_nats(lik), lik if need_lik else None)


_backend.register(OP, "triton")
if _backend.has_ext_op("entropy_bottleneck_fused"):
    _backend.register(OP, "cpu", "cuda")
