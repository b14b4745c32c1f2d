# SPDX-License-Identifier: Apache-2.0
"""Host overhead at CIFD's small sizes, where it outweighs the kernels.

    python -m benchmarks.host_overhead [--calls 500] [--threads 1] [--device cpu|cuda]

Three measurements, each side in the same run, interleaved call by call:

* ``ibm_step``: one IBM fwd+bwd at [128, 32] (the stage-2 student's embedding)
  through the module, on the eager path (provider ``eager_function``: on the
  CPU since session 5 the one C++ op ``cifd_C::entropy_bottleneck_fused`` with
  C++ autograd, before that one Python autograd.Function per op) against the
  ``eager_via_ops`` kernel option (``custom_ops``). Since session 13 the C++
  backends have that one op on both (the two providers time the same route: a
  check of the noise); on Triton the second is the registered ops;
* ``bank_targets``: the frozen bank's stage-2 targets at the Fashion-MNIST recipe
  size (N = 3, B = 128, D = H = L = 128, K = 10): the eval forward
  (``eval_forward``: x_hat, logits, rates and losses) against
  ``RDMBank.frozen_targets`` (x_hat and logits only);
* ``eb_kernels`` (CPU only): the two raw C++ entropy kernels alone on the same
  [128, 32] problem, the floor the IBM step sits on.

Reports the median and minimum per call; writes a results JSON (device, versions,
commit) like the pytest benchmarks.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.utils import script_args, synchronize, write_results


def _interleaved(fns: dict, calls: int, device, warmup: int = 30, before: dict = None) -> dict:
    """Times of ``fns``' calls, interleaved; ``before[k]()`` runs untimed before each ``fns[k]()``."""
    before = before or {}
    for _ in range(warmup):
        for k, fn in fns.items():
            before.get(k, lambda: None)()
            fn()
    synchronize(device)
    times = {k: [] for k in fns}
    for _ in range(calls):
        for k, fn in fns.items():
            before.get(k, lambda: None)()
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[k].append(time.perf_counter() - t0)
    return times


def _ibm(device, calls):
    from cifd_kernels import IBM
    from cifd_kernels.backend import kernel_options, set_kernel_options
    torch.manual_seed(0)
    ibm = IBM(32, s=0.1).to(device)
    w = torch.randn(128, 32, device=device, requires_grad=True)
    g = torch.randn(128, 32, device=device)
    leaves = [w] + [p for n, p in ibm.named_parameters() if n != "quantiles"]

    def run():
        w_hat, rate = ibm(w, seed=3)
        torch.autograd.grad((w_hat * g).sum() + rate.sum(), leaves)

    with kernel_options():  # the options in force are put back afterwards
        return _interleaved({"eager_function": run, "custom_ops": run}, calls, device,
                            before={"eager_function": lambda: set_kernel_options(eager_via_ops=False),
                                    "custom_ops": lambda: set_kernel_options(eager_via_ops=True)})


def _eb_kernels(calls):
    from cifd_kernels import IBM
    from cifd_kernels.ops import density_pack as P
    torch.manual_seed(0)
    ibm = IBM(32, s=0.1)
    packed = P.pack_density(*ibm._params()).detach()
    y, g, gr = torch.randn(128, 32), torch.randn(128, 32), torch.randn(128)
    none = packed.new_empty((0,))

    def run():
        torch.ops.cifd_C.entropy_bottleneck_fwd(y, packed, none, 0, 3, 0, 0.0, 0.1, 1e-9, False)
        torch.ops.cifd_C.entropy_bottleneck_bwd(y, packed, none, g, gr, none, 0, 3, 0, 0.0, 0.1, 1e-9,
                                                False)
    return _interleaved({"cpu_kernels": run}, calls, torch.device("cpu"))


def _bank(device, calls):
    from cifd_kernels import RDMBank
    torch.manual_seed(0)
    bank = RDMBank(3, 128, 128, 128, 10, R=(10.0, 1.0, 0.3)).to(device).eval()
    x = torch.randn(128, 128, device=device)

    def forward():
        with torch.no_grad():
            bank(x)
    return _interleaved({"eval_forward": forward, "frozen_targets": lambda: bank.frozen_targets(x)},
                        max(calls // 2, 20), device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=500)
    args, device = script_args(ap, argv, "calls", 20)
    runs = [("ibm_step", (128, 32), "eager_function", _ibm(device, args.calls)),
            ("bank_targets", (3, 128, 128, 128, 128, 10), "frozen_targets", _bank(device, args.calls))]
    if device.type == "cpu":
        runs.append(("eb_kernels", (128, 32), None, _eb_kernels(args.calls)))
    records = []
    for op, shape, fast, times in runs:
        for provider, ts in times.items():
            med = statistics.median(ts)
            line = f"{op} {tuple(shape)} {provider}: median {med * 1e3:.3f} ms, min {min(ts) * 1e3:.3f} ms"
            if fast is not None and provider != fast:
                ratio = med / statistics.median(times[fast])
                line += f" ({ratio:.2f}x the {fast} median)"
            print(line)
            records.append({
                "name": f"{op}[{'x'.join(map(str, shape))}-{provider}]", "op": op, "provider": provider,
                "shape": list(shape), "mode": "full" if op != "bank_targets" else "fwd",
                "dtype": "float32", "baseline": None if fast is None else
                next(k for k in times if k != fast), "median_s": med, "min_s": min(ts),
                "max_s": max(ts), "mean_s": statistics.fmean(ts), "stddev_s": statistics.pstdev(ts),
                "rounds": len(ts),
                "threads": torch.get_num_threads() if device.type == "cpu" else None,
            })
    path = write_results(records, device, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
