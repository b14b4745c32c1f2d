# SPDX-License-Identifier: Apache-2.0
"""Compile every Triton kernel of the package for a GPU, on a machine without one:

    TRITON_INTERPRET=0 python3 tools/triton_aot.py [--arch 90] [--jobs 2] [--list]

The interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) executes a
kernel's Python and never compiles it, so code that only the compiler rejects passes
every CPU test and fails on the first GPU: on 2026-12-04 the H200 rejected the GELU
branch of ``rdm_linear`` (a kernel read a plain global float; Triton needs it
``tl.constexpr``). Triton's compiler itself needs no GPU (ptxas ships with it), so this
runs the launchers on small CPU tensors with their GPU choices (tile sizes, the inline
PTX helpers, no interpreter flags), records each launch instead of running it, and
compiles every distinct specialization (signature, constexprs, launch options) to a
cubin for sm_ARCH. The launches cover each value of each kernel's constexprs and each
input dtype (not their product).

Exit status 0 when all compile; 1 with each failure's first lines."""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")  # the GPU code paths (read at import)

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cifd_kernels._triton import cifd_loss as _loss, entropy_bottleneck as _eb  # noqa: E402
from cifd_kernels._triton import philox as _philox, rdm_bank as _bank  # noqa: E402

MODULES = (_eb, _loss, _philox, _bank)
_PTR = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
        torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn, module, name, launches):
        self.fn, self.module, self.name, self.launches = fn, module, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(_spec(self.fn, self.module, self.name, args, kwargs))
        return launch


def _spec(fn, module, name, args, kwargs) -> tuple:
    """(module name, kernel name, signature, constexprs, options) of a launch of ``fn``:
    picklable, hashable."""
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in fn.arg_names))
    sig, const = [], []
    for i, p in enumerate(fn.params):
        v = bound[p.name]
        if p.is_constexpr or v is None:
            sig.append((p.name, "constexpr"))
            const.append((i, v))
        elif isinstance(v, torch.Tensor):
            sig.append((p.name, "*" + _PTR[v.dtype]))
        elif isinstance(v, bool):
            sig.append((p.name, "i1"))
        elif isinstance(v, int):
            sig.append((p.name, "i32" if -2**31 <= v < 2**31 else "i64"))
        elif isinstance(v, float):
            sig.append((p.name, "fp32"))
        else:
            raise TypeError(f"{name}: argument {p.name} of type {type(v).__name__}")
    return module.__name__, name, tuple(sig), tuple(const), options


def _kernels(module):
    return [n for n, v in vars(module).items() if isinstance(v, triton.runtime.jit.JITFunction)
            and n.endswith("_kernel")]


def record() -> list[tuple]:
    """Run the launchers over the configurations below; the distinct launches."""
    launches: list[tuple] = []
    saved = []
    for m in MODULES:
        for name in _kernels(m):
            fn = getattr(m, name)
            saved.append((m, name, fn))
            setattr(m, name, _Recorder(fn, m, name, launches))
        if hasattr(m, "wrap_triton"):
            saved.append((m, "wrap_triton", m.wrap_triton))
            m.wrap_triton = lambda k: k
    try:
        _launch_all()
    finally:
        for m, name, v in saved:
            setattr(m, name, v)
    return list(dict.fromkeys(launches))


def _launch_all() -> None:
    g = torch.Generator().manual_seed(0)
    C, G = 4, 3
    # entropy bottleneck: every mode on the flat, spatial and grouped layouts (float32),
    # each half dtype once per layout, the scaled noise channel, with and without the
    # likelihoods and each backward gradient present or absent
    layouts = {"flat": ((8, C), None), "spatial": ((2, C, 3), None), "groups": ((G, 8, C), G),
               # the tiles of realistic sizes: (65536, 320) and a [N, 192, 16, 16] latent
               "flat_wide": ((64, 320), None), "spatial_big": ((2, 8, 256), None)}
    runs = [(lay, mode, torch.float32) for lay in layouts for mode in ("noise", "dequantize", "none")]
    runs += [(lay, "noise", dt) for lay in layouts for dt in (torch.float16, torch.bfloat16)]
    for i, (lay, mode, dt) in enumerate(runs):
        shape, groups = layouts[lay]
        cp = (shape[1] if lay.startswith("spatial") else shape[-1]) * (groups or 1)
        y = torch.randn(shape, generator=g).to(dt)
        packed = torch.zeros(_eb.NUM_PACKED, cp)
        med = torch.zeros(cp)
        s = 0.5 if (mode == "noise" and i % 2) else 1.0
        _eb.entropy_bottleneck_fwd(y, packed, med, mode, 1, 0, 0.25, s, 1e-9, need_likelihood=i % 2 == 0,
                                   groups=groups)
        rows = shape[:2] if groups else shape[:1]
        _eb.entropy_bottleneck_bwd(y, packed, med, torch.ones_like(y) if i % 3 else None,
                                   torch.ones(rows) if i % 2 else None,
                                   torch.ones(shape) if i % 4 == 0 else None, mode, 1, 0, 0.25, s, 1e-9,
                                   groups=groups)
    # the loss: groups or not, embeddings (mse, smooth_l1) or none, group weights, dtypes
    B, K, D, M = 4, 10, 6, 2
    for i, (dt, emb, dist, grouped) in enumerate([
            (torch.float32, False, "mse", False), (torch.float32, True, "mse", False),
            (torch.float32, True, "smooth_l1", True), (torch.float16, True, "mse", False),
            (torch.bfloat16, True, "smooth_l1", True)]):
        lead = (G, B) if grouped else (B,)
        z = torch.randn(lead + (K,), generator=g).to(dt)
        u = torch.randn(lead + (D,), generator=g).to(dt) if emb else None
        x = torch.randn(M, B, D, generator=g).to(dt) if emb else None
        _loss.cifd_loss_fwd(z, torch.randn(M, B, K, generator=g).to(dt), torch.zeros(B, dtype=torch.long), u, x,
                            torch.ones(M), torch.ones(M, dtype=torch.bool), torch.tensor(4.0), 2.0, 1.0, 1.0,
                            1.0, dist, -100, group_w=torch.ones(G) if grouped and i % 2 else None)
    # philox
    _philox.philox_uniform(torch.empty(8), 1, 0)
    _philox.philox_keep_mask(torch.empty(8, dtype=torch.bool), 1, 0, 0.5)
    # rdm_linear: each activation, shared and per-RDM inputs, each dtype
    for act in (0, 1, 2):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn((5, 7) if act != 1 else (3, 5, 7), generator=g).to(dt)
            _bank.rdm_linear_fwd(x, torch.randn(3, 6, 7, generator=g).to(dt), torch.zeros(3, 6).to(dt), act)


def _with_tf32(specs: list[tuple]) -> list[tuple]:
    """rdm_linear's TF32 branch: taken on CUDA tensors only (torch's matmul flag)."""
    extra = []
    for mod, name, sig, const, opts in specs:
        if name == "_rdm_linear_fwd_kernel" and dict(sig)["x_ptr"] == "*fp32":
            fn = getattr(sys.modules[mod], name)
            i = fn.arg_names.index("ALLOW_TF32")
            extra.append((mod, name, sig, tuple((j, True if j == i else v) for j, v in const), opts))
    return list(dict.fromkeys(specs + extra))


def compile_spec(spec: tuple, arch: int) -> tuple[str, float, str]:
    """Compile one launch: (description, seconds, "" or the error's first lines)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    mod, name, sig, const, opts = spec
    fn = getattr(sys.modules[mod], name)
    desc = f"{name} {dict((fn.arg_names[i], v) for i, v in const)} " \
           f"{[t for _, t in sig if t.startswith('*')]} {dict(opts)}"
    t0 = time.monotonic()
    try:
        src = ASTSource(fn=fn, signature=dict(sig), constexprs={(i,): v for i, v in const})
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(opts))
        if not kernel.asm.get("cubin"):
            raise RuntimeError("no cubin")
        err = ""
    except Exception as e:  # report, go on with the others
        err = f"{type(e).__name__}: " + "\n".join(str(e).strip().splitlines()[-12:])
    return desc, time.monotonic() - t0, err


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--list", action="store_true", help="list the launches, compile nothing")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_aot: run with TRITON_INTERPRET=0 (the GPU code paths)", file=sys.stderr)
        return 2
    specs = _with_tf32(record())
    print(f"triton_aot: {len(specs)} launches to compile for sm_{args.arch}", flush=True)
    if args.list:
        for s in specs:
            print(" ", s[1], dict(s[3]), dict(s[4]))
        return 0
    failed = 0
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
        for desc, secs, err in pool.map(compile_spec, specs, [args.arch] * len(specs)):
            print(f"{'FAIL' if err else 'ok  '} {secs:6.1f}s {desc}", flush=True)
            if err:
                failed += 1
                print("     " + err.replace("\n", "\n     "), flush=True)
    print(f"triton_aot: {len(specs) - failed} compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
