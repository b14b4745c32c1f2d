# SPDX-License-Identifier: Apache-2.0
"""``cifd::cifd_loss``: the fused stage-2 CIFD student loss (docs/METHOD.md section 4).

The kernels make one pass over the student's logits [B, K] and embedding [B, D]
(two sweeps over K per row) and return the loss together with its gradients
with respect to ``student_logits`` and ``student_emb`` (Liger-Kernel style);
those gradients are the op's saved state, and backward only multiplies them by
``grad_output`` (the loss is a scalar). Memory: one [B, K] and one [B, D]
gradient held from forward to backward, nothing else.

The targets (teacher and RDM logits and embeddings) and ``lam`` are frozen: the
kernels give them no gradient. ``auto`` sends a call in which any of them
requires grad to the reference (which differentiates them); a named kernel
backend raises. The IBM rate term ([B]) is plain torch and differentiable.

Backends: ``cuda`` (csrc/cuda/cifd_loss.cu, when ``cifd_kernels._C`` was built
with it), ``triton`` (GPU, or CPU under ``TRITON_INTERPRET=1``) and ``cpu`` (C++,
when ``_C`` has it); ``reference`` anywhere. The kernels take
float32/float16/bfloat16; float64 goes to the reference under ``auto``.

``auto`` on a GPU picks ``cuda``, then ``triton``: the project-wide order of
:mod:`cifd_kernels.backend`, kept for this op because the CUDA kernel needs
neither Triton nor a JIT compile on first use (Triton specialises per K and
dtype), reads each row as often as the Triton kernel does (two sweeps; the op is
memory-bound at CIFD's sizes, so neither should win on traffic), and is bitwise
reproducible run to run (one block per row, fixed-order block sums, no atomics).
The GPU benchmark (benchmarks/bench_cifd_loss.py, providers ``cuda`` and
``triton``) is where a faster Triton would show; ``backend="triton"`` stays available.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch

from .. import backend as _backend
from . import _eager
from ..reference import _checks
from ..reference import cifd_loss as _ref
from ..reference.philox import check_seed_offset

OP = "cifd_loss"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DIST_CODES = {"mse": 0, "smooth_l1": 1}


def _triton():
    from .._triton import cifd_loss as m
    return m


def _has_cuda_kernel() -> bool:
    # A _C built with CUDA but before csrc/cuda/cifd_loss.cu has the op without a CUDA kernel.
    return (_backend.has_ext_op("cifd_loss_fused") and getattr(_backend.ext(), "WITH_CUDA", False)
            and torch._C._dispatch_has_kernel_for_dispatch_key("cifd_C::cifd_loss_fwd", "CUDA"))


_CUDA_MAX_TARGETS = 1024  # cifd::cuda::kCifdLossMaxTargets (csrc/include/cifd/kernels.h)


# ----------------------------------------------------------------------------- Triton
# The C++ backends (cpu, cuda) have one op, cifd_C::cifd_loss_fused, with its autograd in
# C++ (see below the public functional). The Triton kernel is the cifd::cifd_loss custom
# op; eagerly, one autograd.Function runs the same implementation and backward without
# custom-op dispatch (ops/_eager.py).
def _fwd_impl(student_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
              student_emb: Optional[torch.Tensor], target_embs: Optional[torch.Tensor],
              lam: torch.Tensor, keep: torch.Tensor, group_w: Optional[torch.Tensor], tau: float,
              lam_ce: float, lam_kl: float, w_emb: float, dist: str, ignore_index: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss (lam_I term excluded), ce, kl [M], emb [M], grad_logits, grad_emb).

    Groups (the RDM bank's stage-1 losses, :func:`grouped_loss`): ``student_logits``
    [G, B, K] and ``student_emb`` [G, B, D] against the shared [M, B, *] targets, with
    ``group_w`` [G] (or None: ones) weighting each group's embedding term; then
    ``loss`` and ``ce`` are [G], ``kl`` and ``emb`` [M, G]."""
    B = student_logits.shape[-2]
    if labels.device.type == "cpu":  # the Triton interpreter; on a GPU the kernel asserts
        _ref.check_labels(labels, student_logits.shape[-1], ignore_index)
    nvalid = (labels != ignore_index).sum().clamp_min(1).to(torch.float32)
    gw = (group_w.float().contiguous() if group_w is not None
          else student_logits.new_empty((0,), dtype=torch.float32))
    ce_b, kl_mb, emb_mb, gz, gu = _triton().cifd_loss_fwd(
        student_logits, target_logits, labels, student_emb, target_embs, lam, keep, nvalid,
        tau, lam_ce, lam_kl, w_emb, dist, ignore_index, group_w=gw)
    if _backend.has_ext_op("cifd_loss_reduce"):  # the C++ op's reduction: the same ATen ops
        loss, ce, kl, emb = torch.ops.cifd_C.cifd_loss_reduce(ce_b, kl_mb, emb_mb, lam, nvalid, gw,
                                                              lam_ce, lam_kl, w_emb)
    else:
        lam_b = lam.view((-1,) + (1,) * (ce_b.dim() - 1))  # against [M] or [M, G] means
        ce = ce_b.sum(-1) / nvalid
        kl = kl_mb.sum(-1) / B
        emb = emb_mb.sum(-1) / B
        emb_loss = (lam_b * emb).sum(0) * w_emb
        if gw.numel() > 0:
            emb_loss = emb_loss * gw
        loss = ce * lam_ce + (lam_b * kl).sum(0) * lam_kl + emb_loss
    return loss, ce, kl, emb, gz, gu


_fwd_op = torch.library.custom_op("cifd::cifd_loss", mutates_args=())(_fwd_impl)


@_fwd_op.register_fake
def _(student_logits, target_logits, labels, student_emb, target_embs, lam, keep, group_w, tau, lam_ce,
      lam_kl, w_emb, dist, ignore_index):
    M = target_logits.shape[0]
    groups = tuple(student_logits.shape[:-2])  # () or (G,)
    f32 = dict(dtype=torch.float32, device=student_logits.device)
    gu = torch.empty_like(student_emb) if student_emb is not None else student_logits.new_empty((0,))
    return (torch.empty(groups, **f32), torch.empty(groups, **f32), torch.empty((M,) + groups, **f32),
            torch.empty((M,) + groups, **f32), torch.empty_like(student_logits), gu)


def _setup_context(ctx, inputs, output):
    ctx.has_emb = inputs[3] is not None
    ctx.save_for_backward(output[4], output[5])


def _backward(ctx, g_loss, g_ce, g_kl, g_emb, g_gz, g_gu):
    # Only the loss is differentiable (the public functional detaches the terms). With
    # groups g_loss is [G]: group g's rows scale by g_loss[g].
    gz, gu = ctx.saved_tensors
    if g_loss is None:  # the eager path does not materialize unused gradients
        return (None,) * 14
    g = g_loss.reshape(g_loss.shape + (1, 1))
    grad_z = gz * g.to(gz.dtype)
    grad_u = gu * g.to(gu.dtype) if ctx.has_emb else None
    return (grad_z, None, None, grad_u) + (None,) * 10


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_EagerFunction = _eager.autograd_function("CIFDLossFunction", _fwd_impl, _setup_context, _backward)


# ----------------------------------------------------------------------------- public functional
def _kernel_ok(*tensors) -> bool:
    return all(t is None or t.dtype in _KERNEL_DTYPES for t in tensors)


def _why_not(lam, inputs, targets):
    """The kernels' fit test for :func:`cifd_kernels.backend.resolve_kernel`: kernel
    dtypes, frozen targets and ``lam``, and the CUDA kernel's target limit (targets[0]
    is ``[M, B, *]``)."""
    def why(be: str) -> Optional[str]:
        if not _kernel_ok(*inputs, *targets):
            return "float32/float16/bfloat16 inputs"
        if not _frozen(lam, *targets):
            return "frozen targets and lam (none requiring grad)"
        t = targets[0]
        if be == "cuda" and t is not None and t.dim() == 3 and t.shape[0] > _CUDA_MAX_TARGETS:
            return f"at most {_CUDA_MAX_TARGETS} targets"
        return None
    return why


def _frozen(lam, *targets) -> bool:
    if isinstance(lam, torch.Tensor) and lam.requires_grad:
        return False
    return not any(t is not None and t.requires_grad for t in targets)


def cifd_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
              student_emb: Optional[torch.Tensor] = None, target_embs: Optional[torch.Tensor] = None,
              lam: Union[Sequence[float], torch.Tensor, None] = None, *, tau: float = 2.0,
              p_drop: float = 0.25, seed: int = 0, offset: int = 0, lam_ce: float = 1.0,
              lam_kl: float = 1.0, w_emb: float = 100.0, dist: str = "mse",
              ibm_rate: Optional[torch.Tensor] = None, lam_I: float = 0.005,
              ignore_index: int = -100, backend: Optional[str] = None):
    """Fused stage-2 CIFD student loss, batch mean (same math, arguments and return as
    :func:`cifd_kernels.reference.cifd_loss.cifd_loss`)::

        L = lam_ce * CE(y, V_S) + lam_kl * sum_m lam_m k_m tau^2 KL(p(V_m) || p(V_S))
          + w_emb * sum_m lam_m k_m dist(U, X_m) + lam_I * rate_I

    Args:
        student_logits: ``[B, K]`` float32/float16/bfloat16 (kernels), student first.
        target_logits: ``[M, B, K]`` teacher first, then the RDMs. Frozen: no gradient.
        labels: ``[B]`` integer; ``ignore_index`` rows leave CE (mean over the others).
            Every other label must be a class in ``[0, K)``, as for F.cross_entropy: on
            CPU tensors another raises IndexError naming ``labels`` before anything reads
            it, the same on every backend; on a GPU
            the kernels check on the device (no host sync): a bad label triggers a
            device-side assert, reported at the next synchronisation, as with torch's
            own CUDA losses.
        student_emb: ``[B, D]`` post-IBM student embedding U, or None (with target_embs).
        target_embs: ``[M, B, D]`` teacher X first, then the RDMs' Xh_n. Frozen.
        lam: ``[M]`` weights (lam_0 = 1 in the paper); None = ones. Frozen on the kernels.
        tau: temperature > 0; the KL is scaled by ``tau^2`` (Hinton's convention).
        p_drop, seed, offset: KD-dropout; keep flags exactly
            :func:`~cifd_kernels.reference.cifd_loss.kd_keep_flags` (Philox word 1 of
            counters offset .. offset+M-1). Dropped targets are never read.
        lam_ce, lam_kl, w_emb, lam_I: term weights. dist: ``"mse"`` | ``"smooth_l1"``
            (sum over D). ibm_rate: ``[B]`` nats or None (plain torch, differentiable).
        backend: ``auto|cuda|triton|cpu|reference`` (default ``$CIFD_BACKEND``/auto).

    Returns:
        ``(loss, terms)``: ``loss`` 0-dim float32 (float64 on the reference for float64
        inputs); ``terms`` ``ce``, ``kl`` [M], ``emb`` [M], ``keep`` [M] bool, ``rate``,
        ``loss``. On the kernel backends the terms other than ``loss`` and ``rate`` are
        detached (values only): differentiate ``loss``.
    """
    _checks.check_tensor("student_logits", student_logits, ndim=2)
    be = _backend.resolve_kernel(OP, backend, student_logits.device,
                                 _why_not(lam, (student_logits, student_emb), (target_logits, target_embs)))
    kwargs = dict(tau=tau, p_drop=p_drop, seed=seed, offset=offset, lam_ce=lam_ce, lam_kl=lam_kl,
                  w_emb=w_emb, dist=dist, ibm_rate=ibm_rate, lam_I=lam_I, ignore_index=ignore_index)
    if be == "reference":
        return _ref.cifd_loss(student_logits, target_logits, labels, student_emb, target_embs, lam,
                              **kwargs)

    # The reference's checks, on metadata only.
    batch, k, m = _ref.check_loss_args(student_logits, target_logits, labels, student_emb, target_embs,
                                       ibm_rate, tau=tau, p_drop=p_drop, dist=dist,
                                       ignore_index=ignore_index, lam_ce=lam_ce, lam_kl=lam_kl,
                                       w_emb=w_emb, lam_I=lam_I)
    check_seed_offset(seed, offset, m)
    seed = _eager.eager_seed(seed, student_logits)

    lam_t = _ref._check_lam(lam, m, student_logits.device, torch.float32, "cifd_loss").detach()
    t_embs = target_embs.detach() if target_embs is not None else None
    loss, ce, kl, emb, keep, rate = _run(
        be, student_logits, target_logits.detach(), labels, student_emb, t_embs, lam_t, ibm_rate, tau,
        p_drop, seed, offset, lam_ce, lam_kl, w_emb, lam_I, dist, ignore_index)
    return loss, {"ce": ce, "kl": kl, "emb": emb, "keep": keep, "rate": rate, "loss": loss}


def _run(be, logits, targets, labels, emb, target_embs, lam, ibm_rate, tau, p_drop, seed, offset, lam_ce,
         lam_kl, w_emb, lam_I, dist, ignore_index, group_w=None):
    """The kernel backend ``be`` on checked arguments (targets and lam detached): ``(loss,
    ce, kl, emb_terms, keep, rate)``, the terms detached, ``loss`` differentiable with
    respect to ``logits``, ``emb`` and ``ibm_rate``; rate = mean(ibm_rate) (0 without),
    in the loss at weight ``lam_I``. One route per backend: ``cpu``, ``cuda`` the C++ op
    (keep flags, kernel, means and rate term in one call), ``triton`` the same steps here."""
    tau, lam_ce, lam_kl, w_emb = float(tau), float(lam_ce), float(lam_kl), float(w_emb)
    if be != "triton":
        return _cpp(logits, targets, labels, emb, target_embs, lam, ibm_rate, tau, float(p_drop), seed,
                    int(offset), lam_ce, lam_kl, w_emb, float(lam_I), _DIST_CODES[dist], int(ignore_index),
                    group_w)
    keep = _keep_flags(targets.shape[0], seed, offset, p_drop, logits.device)
    loss, ce, kl, emb_t, _, _ = _eager.call(_fwd_op, _EagerFunction, logits, targets, labels, emb,
                                            target_embs, lam, keep, group_w, tau, lam_ce, lam_kl, w_emb, dist,
                                            int(ignore_index))
    rate = torch.zeros((), dtype=torch.float32, device=logits.device)
    if ibm_rate is not None:
        rate = ibm_rate.float().mean()
        loss = loss + lam_I * rate
    return loss, ce.detach(), kl.detach(), emb_t.detach(), keep, rate


# The "cpu" and "cuda" backends: cifd_C::cifd_loss_fused (python/cifd_loss_fused.cpp),
# keep flags, kernel, batch means and the IBM rate term in one op whose autograd is C++
# (chosen by measurement, as the entropy op's: benchmarks/NOTES.md), eagerly and under
# tracing alike (its sub-ops' fakes below: torch.compile traces through its C++ autograd).
def _cpp(logits, targets, labels, emb, target_embs, lam, ibm_rate, tau, p_drop, seed, offset, lam_ce,
         lam_kl, w_emb, lam_I, dist, ignore_index, group_w=None):
    """``cifd_C::cifd_loss_fused`` on these arguments; ``seed`` an int or (drawn in a traced
    graph) a seed tensor, which the op reads when it runs. The first eager lookup
    registers the fakes (while compiling, :func:`_has_cpp_op` has run outside the graph)."""
    seed, seed_tensor = (0, seed) if isinstance(seed, torch.Tensor) else (int(seed), None)
    if torch.compiler.is_compiling():
        _has_cpp_op()
        op = torch.ops.cifd_C.cifd_loss_fused
    else:
        op = _fused_op()
    return op(logits, targets, labels, emb, target_embs, lam, ibm_rate, tau, p_drop, seed, offset, lam_ce,
              lam_kl, w_emb, lam_I, dist, ignore_index, group_w, seed_tensor)


@functools.lru_cache(maxsize=None)
def _fused_op():
    """``torch.ops.cifd_C.cifd_loss_fused``, or None for a ``_C`` without it. The first
    lookup registers the fake kernels of it and of the ops it calls."""
    if not _backend.has_ext_op("cifd_loss_fused"):
        return None
    for name, fake in (("cifd_loss_fwd", _fake_cpp_fwd), ("cifd_loss_reduce", _fake_cpp_reduce),
                       ("philox_keep_mask_out", _fake_keep_out), ("cifd_loss_fused", _fake_cpp_fused)):
        torch.library.register_fake(f"cifd_C::{name}")(fake)
    return torch.ops.cifd_C.cifd_loss_fused


@torch.compiler.assume_constant_result
def _has_cpp_op() -> bool:
    return _fused_op() is not None


def _fake_cpp_fwd(logits, targets, labels, emb, target_embs, lam, keep, nvalid, group_w, tau, lam_ce,
                  lam_kl, w_emb, dist, ignore_index):
    # (ce [*G, B], kl [M, *G, B], emb_terms [M, *G, B], grad_logits, grad_emb)
    f32 = dict(dtype=torch.float32, device=logits.device)
    rows, m = tuple(logits.shape[:-1]), targets.shape[0]
    return (torch.empty(rows, **f32), torch.empty((m,) + rows, **f32), torch.empty((m,) + rows, **f32),
            torch.empty_like(logits), torch.empty_like(emb))


def _fake_cpp_reduce(ce, kl, emb_terms, lam, nvalid, group_w, lam_ce, lam_kl, w_emb):
    return (ce.new_empty(ce.shape[:-1]), ce.new_empty(ce.shape[:-1]), kl.new_empty(kl.shape[:-1]),
            emb_terms.new_empty(emb_terms.shape[:-1]))


def _fake_keep_out(out, seed, offset, rho, seed_tensor=None):
    return None


def _fake_cpp_fused(logits, targets, labels, emb, target_embs, lam, ibm_rate, tau, p_drop, seed, offset,
                    lam_ce, lam_kl, w_emb, lam_I, dist, ignore_index, group_w=None, seed_tensor=None):
    f32 = dict(dtype=torch.float32, device=logits.device)
    groups, m = tuple(logits.shape[:-2]), targets.shape[0]
    return (torch.empty(groups, **f32), torch.empty(groups, **f32), torch.empty((m,) + groups, **f32),
            torch.empty((m,) + groups, **f32), torch.empty((m,), dtype=torch.bool, device=logits.device),
            torch.empty((), **f32))


def grouped_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
                 student_emb: torch.Tensor, target_embs: torch.Tensor, group_w: torch.Tensor, *,
                 tau: float, lam_ce: float, lam_kl: float, dist: str, ignore_index: int,
                 backend: Optional[str] = None):
    """G students' losses against the same frozen targets, in one kernel pass (the RDM
    bank's stage 1: :func:`cifd_kernels.ops.rdm_bank.rdm_bank_loss`; no KD-dropout).

    ``student_logits`` [G, B, K] and ``student_emb`` [G, B, D] (float32/float16/bfloat16),
    ``target_logits`` [M, B, K] and ``target_embs`` [M, B, D] frozen, ``labels`` [B]
    (range-checked by the kernels as in :func:`cifd_loss`), ``group_w`` [G] float32 on
    the students' device: group g's embedding weight. Per
    group, over its B rows, the :func:`cifd_loss` formula with ``lam`` = ones and
    ``w_emb = group_w[g]``. Returns ``(loss [G], ce [G], kl [M, G], emb [M, G])``;
    ``loss`` is differentiable with respect to the students' logits and embeddings, the
    terms are detached. Arguments are checked by the caller; ``backend`` resolves
    among the kernels (``auto`` when None)."""
    be = _backend.resolve_kernel(OP, backend, student_logits.device,
                                 _why_not(None, (student_logits, student_emb), (target_logits, target_embs)))
    if be == "reference":
        raise _backend.BackendUnavailableError(
            "grouped_loss runs on the loss kernels only (cpu, cuda or triton); none fits here")
    lam_t = torch.ones(target_logits.shape[0], dtype=torch.float32, device=student_logits.device)
    return _run(be, student_logits, target_logits.detach(), labels, student_emb, target_embs.detach(), lam_t,
                None, tau, 0.0, 0, 0, lam_ce, lam_kl, 1.0, 0.0, dist, ignore_index, group_w)[:4]


def _keep_flags(m: int, seed: int, offset: int, p_drop: float, device) -> torch.Tensor:
    """The reference's :func:`~cifd_kernels.reference.cifd_loss.kd_keep_flags`, drawn by the
    ``cifd::philox_keep_mask`` op (same bits, one kernel instead of ~40 small int64 ops);
    with ``p_drop = 0`` every flag is 1 (U >= 0 always), so nothing is drawn."""
    if p_drop == 0.0:
        return torch.ones(m, dtype=torch.bool, device=device)
    from .philox import philox_keep_mask
    return philox_keep_mask((m,), seed, offset, p_drop, device=device)


def cifd_embedding_loss(student_emb: torch.Tensor, target_embs: torch.Tensor,
                        contrast_emb: Optional[torch.Tensor] = None,
                        lam: Union[Sequence[float], torch.Tensor, None] = None, *, dist: str = "mse",
                        w_emb: float = 1.0, p_drop: float = 0.0, seed: int = 0, offset: int = 0,
                        ibm_rate: Optional[torch.Tensor] = None, lam_I: float = 0.005,
                        lam_cl: float = 0.005, temperature: float = 0.07, backend: Optional[str] = None):
    """Embedding-only CIFD loss (the paper's CLIP setting), same math, arguments and return
    as :func:`cifd_kernels.reference.cifd_loss.cifd_embedding_loss`, plus ``backend``::

        L = w_emb * sum_m lam_m k_m dist(U, X_m) + lam_I * rate_I + lam_cl * InfoNCE(U, contrast_emb)

    The embedding terms run through the same fused kernel as :func:`cifd_loss` (one pass
    over U writing its gradient; the logit part is switched off: a width-1 dummy row,
    every label ignored, ``lam_ce = lam_kl = 0``). InfoNCE (a [B, B] similarity GEMM on
    L2-normalised embeddings) and the rate are plain torch and differentiable. On the
    kernel paths ``emb`` is detached (values only)."""
    _checks.check_tensor("student_emb", student_emb, ndim=2)

    be = _backend.resolve_kernel(OP, backend, student_emb.device,
                                 _why_not(lam, (student_emb,), (target_embs,)))
    kw = dict(dist=dist, w_emb=w_emb, p_drop=p_drop, seed=seed, offset=offset, ibm_rate=ibm_rate,
              lam_I=lam_I, lam_cl=lam_cl, temperature=temperature)
    if be == "reference":
        return _ref.cifd_embedding_loss(student_emb, target_embs, contrast_emb, lam, **kw)
    # The reference's checks, on metadata only.
    batch, m = _ref.check_embedding_loss_args(student_emb, target_embs, contrast_emb, ibm_rate,
                                              p_drop=p_drop, dist=dist, temperature=temperature,
                                              w_emb=w_emb, lam_I=lam_I, lam_cl=lam_cl)
    ref = student_emb
    check_seed_offset(seed, offset, m)
    seed = _eager.eager_seed(seed, student_emb)

    lam_t = _ref._check_lam(lam, m, ref.device, torch.float32, "cifd_embedding_loss").detach()
    labels = torch.full((batch,), -100, dtype=torch.long, device=ref.device)
    loss, _, _, emb, keep, _ = _run(be, ref.new_zeros((batch, 1)), ref.new_zeros((m, batch, 1)), labels,
                                    student_emb, target_embs.detach(), lam_t, None, 1.0, p_drop, seed, offset,
                                    0.0, 0.0, w_emb, 0.0, dist, -100)
    rate = ibm_rate.float().mean() if ibm_rate is not None else torch.zeros((), device=ref.device)
    if lam_cl != 0:
        nce = _ref.info_nce(student_emb, contrast_emb, temperature).float().mean()
    else:
        nce = torch.zeros((), device=ref.device)
    loss = loss + lam_I * rate + lam_cl * nce
    terms = {"emb": emb, "keep": keep, "rate": rate, "nce": nce, "loss": loss}
    return loss, terms


_backend.register(OP, "triton")
if _backend.has_ext_op("cifd_loss_fused"):
    _backend.register(OP, "cpu")
if _has_cuda_kernel():
    _backend.register(OP, "cuda")
