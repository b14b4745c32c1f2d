# SPDX-License-Identifier: Apache-2.0
"""Static SASS profile of the entropy-bottleneck GPU kernels, with no GPU.

Compiles the CUDA kernels (``csrc/cuda/entropy_bottleneck.cu``, nvcc ``-arch=sm_90a``)
and the Triton kernels (``cifd_kernels/_triton/entropy_bottleneck.py``, Triton's own
compiler for an sm_90 target) and prints, per kernel: registers, local memory (spills),
the instruction count of the per-element loop body (the largest loop; for the Triton
forward, which has no loop, the kernel over its elements per thread), and how many of
those are special-function (MUFU) instructions. Stack bytes are where spilled
registers go (their STL/LDL instructions show in the counts).

Instruction counts are what an H100/H200 issues per element per thread, so they bound
throughput from below (one warp instruction per cycle per scheduler); registers set
occupancy. Timing still needs a GPU (``tools/gpu_check.sh``). Usage::

    CUDA_HOME=/usr/local/cuda python tools/sass_stats.py [--cuda] [--triton] [--keep DIR]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INSN = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _triton_bin(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise SystemExit(f"{name} not found at {path} (it ships with triton's NVIDIA backend)")
    return path


def _functions(sass: str) -> dict[str, list[tuple[int, str, str]]]:
    """function name -> [(address, opcode, operands)]."""
    out: dict[str, list[tuple[int, str, str]]] = {}
    cur = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            out[cur] = []
            continue
        m = _INSN.match(line)
        if m and cur is not None:
            out[cur].append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def _main_loop(insns):
    """(lo, hi) of the largest backward branch's span, or None."""
    best = None
    for addr, op, rest in insns:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t and int(t.group(1), 16) < addr:
                span = (int(t.group(1), 16), addr)
                if best is None or span[1] - span[0] > best[1] - best[0]:
                    best = span
    return best


def _stats(insns, per_thread: int = 1):
    loop = _main_loop(insns)
    body = [i for i in insns if loop is None or loop[0] <= i[0] <= loop[1]]
    ops = collections.Counter(op for _, op, _ in body)
    mufu = sum(v for k, v in ops.items() if k.startswith("MUFU"))
    n = len(body) / per_thread
    return {"loop": loop is not None, "insns": round(n), "mufu": round(mufu / per_thread, 1),
            "top": ops.most_common(6)}


def _resources(cubin: str) -> dict[str, tuple[int, int]]:
    res = subprocess.run([_triton_bin("cuobjdump"), "-res-usage", cubin], capture_output=True,
                         text=True, check=True).stdout
    out, name = {}, None
    for line in res.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
        m = re.search(r"REG:(\d+) STACK:(\d+)", line)
        if m and name:
            out[name] = (int(m.group(1)), int(m.group(2)))
    return out


def _report(label, cubin, pick, per_thread=lambda name: 1):
    sass = subprocess.run([_triton_bin("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                          check=True).stdout
    res = _resources(cubin)
    for name, insns in _functions(sass).items():
        short = pick(name)
        if short is None:
            continue
        st = _stats(insns, per_thread(short))
        regs, stack = res.get(name, (-1, -1))
        where = "loop body" if st["loop"] else f"kernel / {per_thread(short)}"
        print(f"{label:7s} {short:34s} regs {regs:3d} stack {stack:4d} B  per element ({where}): "
              f"{st['insns']:5d} insns, {st['mufu']:5.1f} MUFU   top {st['top']}")


def cuda(keep: str) -> None:
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    cubin = os.path.join(keep, "entropy_bottleneck_sm90a.cubin")
    subprocess.run([nvcc, "-cubin", "-arch=sm_90a", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
                    "-I", os.path.join(ROOT, "csrc", "include"),
                    os.path.join(ROOT, "csrc", "cuda", "entropy_bottleneck.cu"), "-o", cubin], check=True)

    def pick(name):  # float32, noise mode (template argument 0); the backward's MINB variants
        for k in ("fwd_kernel", "bwd_rows_kernel", "bwd_spatial_kernel"):
            m = re.search(r"F32ELi0E(?:Li(\d+)E)?", name)
            if k in name and m:
                return k + (f" (MINB={m.group(1)})" if m.group(1) else "")
        return None
    _report("cuda", cubin, pick)


def triton_kernels(keep: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # the GPU code path (inline PTX), not numpy
    sys.path.insert(0, ROOT)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cifd_kernels._triton import entropy_bottleneck as eb

    def compile_(fn, sig, consts, warps, name):
        sig = dict(sig, **{k: "constexpr" for k in consts})
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        path = os.path.join(keep, name + ".cubin")
        with open(path, "wb") as f:
            f.write(c.asm["cubin"])
        return path

    ints = {k: "i64" for k in ("N", "C", "S", "CP", "seed", "offset")}
    floats = {k: "fp32" for k in ("rho", "s_noise", "bound")}
    # the launchers' GPU tiles for [N, C] inputs with C >= 32 (eb._GPU_FWD, eb._GPU_BWD)
    f_tile, f_maxc, f_warps = eb._GPU_FWD
    b_tile, b_maxc, b_warps = eb._GPU_BWD
    fsig = dict({k: "*fp32" for k in ("y_ptr", "yhat_ptr", "lik_ptr", "rate_ptr", "pp", "med_ptr")},
                **ints, **floats)
    fba, fbb = f_tile // f_maxc, f_maxc
    fwd = compile_(eb._entropy_bottleneck_fwd_kernel, fsig,
                   dict(MODE=0, SPATIAL=False, STORE_LIK=False, INTERPRET=False,
                        BF16_RNE=False, SCALED=False, BA=fba, BB=fbb), f_warps, "triton_fwd")
    bsig = dict({k: "*fp32" for k in ("y_ptr", "gyh_ptr", "grate_ptr", "glik_ptr", "gy_ptr", "gp_ptr", "pp",
                                      "med_ptr")}, **ints, **floats, ROWS_PER_PROG="i64", ITERS="i64")
    bwd = compile_(eb._entropy_bottleneck_bwd_kernel, bsig,
                   dict(MODE=0, SPATIAL=False, HAS_GRATE=True, HAS_GLIK=False,
                        INTERPRET=False, BF16_RNE=False, SCALED=False, BA=b_tile // b_maxc, BB=b_maxc), b_warps,
                   "triton_bwd")
    per_fwd = (fba * fbb) // (32 * f_warps)
    _report("triton", fwd, lambda n: "fwd (noise, fp32)" if "fwd" in n else None, lambda _: per_fwd)
    _report("triton", bwd, lambda n: "bwd (noise, fp32)" if "bwd" in n else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda", action="store_true", help="the CUDA kernels (needs nvcc)")
    ap.add_argument("--triton", action="store_true", help="the Triton kernels")
    ap.add_argument("--keep", help="folder for the cubins (default: a temporary one)")
    args = ap.parse_args()
    both = not (args.cuda or args.triton)
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.keep or tmp
        os.makedirs(keep, exist_ok=True)
        if args.cuda or both:
            cuda(keep)
        if args.triton or both:
            triton_kernels(keep)


if __name__ == "__main__":
    main()
