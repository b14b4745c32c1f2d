# SPDX-License-Identifier: Apache-2.0
"""Which C++ argument errors raise and which crash the process: each case in its own
Python process, one line each (rc -11: a segfault where a RuntimeError was due).

    python3 tools/cpp_error_probe.py [DEBUGGER_TIMEOUT_S (default 150)]

On the H200 (2026-12-04, torch 2.11, _C built by gcc 13.3) every error thrown by the
density-pack ops (python/density_pack.cpp) crashed, on CPU tensors too, while
cifd_C::cifd_loss_fwd's errors raised. The controls tell apart torch's own errors, a
TensorList op of torch's and ours. The first case that crashes is then run once more
under gdb (or cuda-gdb, which the lent machine has and which debugs host code too) for
the native backtrace."""
import os
import shutil
import subprocess
import sys

SETUP = """
import torch, cifd_kernels._C
from cifd_kernels.reference import entropy_bottleneck as ref
from cifd_kernels.ops import density_pack as P
p = ref.init_params(37, generator=torch.Generator().manual_seed(0))
cpu = [t.detach() for t in P._flat(p['matrices'], p['biases'], p['factors'])]
dev = [t.cuda() for t in cpu] if torch.cuda.is_available() else cpu
try:
    {stmt}
    print('no error')
except Exception as e:
    print('raised', type(e).__name__ + ':', str(e).splitlines()[0][:100])
"""
CASES = {
    "torch, one tensor (control)": "torch.zeros(3).view(2, 2)",
    "torch, a tensor list (control)": "torch.cat([torch.zeros(2), torch.zeros(2, 2)])",
    "cifd_C::cifd_loss_fwd, bad labels": (
        "z = torch.zeros(2, 5, device=dev[0].device); e = z.new_empty((0,)); "
        "torch.ops.cifd_C.cifd_loss_fwd(z, z[None], torch.zeros(2), e, e, z.new_ones(1), "
        "torch.ones(2, dtype=torch.uint8, device=z.device), z.new_ones(()), e, 2.0, 1.0, 1.0, "
        "1.0, 0, -100)"),
    "philox_uniform_out, seed -1, cpu (ours, no list)": (
        "torch.ops.cifd_C.philox_uniform_out(torch.empty(4), -1, 0)"),
    "entropy_bottleneck_fused, mode 9, cpu (ours, a list, another file)": (
        "torch.ops.cifd_C.entropy_bottleneck_fused(torch.zeros(4, 37), cpu, None, 9, 0, 0, 0.0, "
        "1.0, 1e-9, True, True, False)"),
    "density_pack, 14 params, cpu (no error due)": "print(torch.ops.cifd_C.density_pack(cpu, False).shape)",
    "density_pack_generic, 5 params, cpu": "torch.ops.cifd_C.density_pack_generic(cpu[:5], False)",
    "density_pack_generic, 5 params, device": "torch.ops.cifd_C.density_pack_generic(dev[:5], False)",
    "density_pack, 5 params, cpu": "torch.ops.cifd_C.density_pack(cpu[:5], False)",
    "density_unpack_grad_generic, bad grad, device": (
        "torch.ops.cifd_C.density_unpack_grad_generic(dev[0].new_zeros(3, 37), dev)"),
}

print("env:", {k: v for k, v in os.environ.items() if k.startswith(("TORCH_", "LD_"))})
crashed = []
for name, stmt in CASES.items():
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", SETUP.format(stmt=stmt)],
                       capture_output=True, text=True, timeout=120)
    out = r.stdout.strip() or r.stderr.strip().splitlines()[-1:]
    print(f"{name}: rc={r.returncode} {out}", flush=True)
    if r.returncode < 0:
        crashed.append(stmt)
limit = float(sys.argv[1]) if len(sys.argv) > 1 else 150.0
debugger = shutil.which("gdb") or shutil.which("cuda-gdb")
if crashed and debugger:
    print(f"\n{debugger}, the first crash:", flush=True)
    cmd = [debugger, "-batch", "-nx", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40",
           "-ex", "info sharedlibrary cifd", "--args", sys.executable, "-c",
           SETUP.format(stmt=crashed[0])]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        lines = (r.stdout + r.stderr).splitlines()
        print("\n".join(line for line in lines if not line.startswith("[New Thread"))[-12000:])
    except subprocess.TimeoutExpired:
        print(f"the debugger ran past {limit} s")
