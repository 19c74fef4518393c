"""One harness for every fused op: median time, GB/s and fraction of the measured copy bandwidth.

For each op (perturb, loss fwd+bwd, churn, euler, heun, and perturb+loss: the pair a training step calls,
where the fused loss regenerates the noise eager keeps), size and dtype, in one run on one machine:
  eager     the official code's op-by-op math in PyTorch (noise from torch.randn, stored for the loss)
  compile   torch.compile (inductor) of that same composite
  <backend> each fused fdm_fast backend available on the device (triton / cuda / cpu; the torch
            reference only with --backends torch: it is the spec, not a performance path)
  copy      a plain device copy of the same number of bytes, the bound a fused op aims at

GB/s counts the bytes a fused op must move (reads + writes; listed per op below), the same for every
implementation, so it reads as effective bandwidth. Input buffers rotate over several sets larger
than the last-level cache, so a CIFAR batch measures memory, not L2. Warm-up (compilation) is timed
apart and excluded from the medians. Rows are appended to benchmarks/RESULTS.md with machine and date.

On a CPU the script first keeps freed blocks in glibc's heap (--malloc steady): otherwise each fresh
output of a few MB may cost a page fault per 4 KiB page or none, depending on what was freed before,
and that alone moved rows 2-10x between runs on a 2-core VM (benchmarks/_harness.py: steady_heap).

Two times per row on a GPU. "call ms" is one call at a time, host included: at these sizes (a few MB)
it is the host's launch latency (the H200 run of 2026-11-29 timed even a plain copy at 0.03-0.06 ms,
1-2% of copy bandwidth). "device ms" replays the same calls from a CUDA graph, so only GPU time
counts: GB/s, % copy BW and the ratios come from it. On a CPU the two are one ("device ms" is -).

    python benchmarks/ops_bandwidth.py                          # all ops, CIFAR and FFHQ-64, fp32+bf16
    python benchmarks/ops_bandwidth.py --ops perturb loss --sizes b64 --dtypes fp32

Under a hard time limit (benchmarks/gpu_check.sh), --time-budget S stops starting new rows S seconds
after the start and writes the table with what was measured; the notes name what was not.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (add_results_arg, append_results, cache_bytes, check_outputs, copy_bandwidth,  # noqa: E402
                      deadline_after, machine_name, steady_heap, time_graphed, time_interleaved, write_json)

from fdm_fast import ops, schedules  # noqa: E402

SIZES = {"cifar": (512, 3, 32, 32), "b64": (64, 3, 64, 64), "ffhq64": (256, 3, 64, 64)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECOND = schedules.get_precond("fdm_edm")
CLAMP = 50.0


def _col(v):
    return v.reshape(-1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------
# Each op: inputs, bytes a fused kernel must move, the eager composite, the fused call.


class Op:
    name = ""

    def inputs(self, shape, dtype, device, g):
        raise NotImplementedError

    def nbytes(self, shape, dtype):
        raise NotImplementedError

    def eager(self, i):
        raise NotImplementedError

    def fused(self, i, backend):
        raise NotImplementedError

    def compiled(self):
        """The compile row: torch.compile of the eager composite."""
        return torch.compile(self.eager, dynamic=False)


class Perturb(Op):
    name = "perturb"
    doc = "read y, write net_in"

    def inputs(self, shape, dtype, device, g):
        y = torch.randn(shape, generator=g).to(device, dtype)
        return dict(y=y, sigma=PRECOND.sample_sigma(shape[0], generator=g).to(device), seed=int(g.seed() % 2**62))

    def nbytes(self, shape, dtype):
        return 2 * math.prod(shape) * dtype.itemsize

    def eager(self, i):
        y, s = i["y"], _col(i["sigma"])
        n = torch.randn_like(y, dtype=torch.float32)
        x = y.float() + s * n
        return (PRECOND.c_in(s) * x).to(y.dtype)

    def fused(self, i, backend):
        return ops.perturb(i["y"], i["sigma"], PRECOND, seed=i["seed"], backend=backend)


class Loss(Op):
    name = "loss fwd+bwd"
    doc = "fwd: read F, y, write G; bwd: read G, write dF (G = the unscaled gradient the forward keeps)"

    def inputs(self, shape, dtype, device, g):
        i = Perturb().inputs(shape, dtype, device, g)
        i["F"] = torch.randn(shape, generator=g).to(device, dtype).requires_grad_(True)
        i["n"] = torch.randn(shape, generator=g).to(device)  # the official code keeps the noise
        return i

    def nbytes(self, shape, dtype):
        return 5 * math.prod(shape) * dtype.itemsize

    @staticmethod
    def composite(F, y, sigma, n):
        s = _col(sigma)
        x = y.float() + s * n
        D = PRECOND.c_skip(s) * x + PRECOND.c_out(s) * F.float()
        w = torch.clamp(PRECOND.loss_weight(s), max=CLAMP)
        return (w * (D - y.float()) ** 2).sum() / F.shape[0]

    def eager(self, i, fn=None):
        loss = (fn or self.composite)(i["F"], i["y"], i["sigma"], i["n"])
        loss.backward()
        i["F"].grad = None

    def fused(self, i, backend):
        loss = ops.denoise_loss(i["F"], i["y"], i["sigma"], PRECOND, seed=i["seed"], clamp=CLAMP, backend=backend)
        loss.backward()
        i["F"].grad = None

    def compiled(self):  # the backward stays outside the compiled function (autograd runs inductor's backward)
        comp = torch.compile(self.composite, dynamic=False)
        return lambda i: self.eager(i, comp)


class PerturbLoss(Loss):
    """The two ops one training step calls, together: what the noise costs per step. Eager draws the noise
    once (torch.randn) for the network input and keeps it for the loss; the fused ops never store it, and
    regenerate it in the loss from the seed the network input was made with."""
    name = "perturb+loss"
    doc = "perturb's and loss fwd+bwd's bytes"

    def inputs(self, shape, dtype, device, g):
        i = super().inputs(shape, dtype, device, g)
        del i["n"]  # drawn in the timed call
        return i

    def nbytes(self, shape, dtype):
        return Perturb.nbytes(self, shape, dtype) + super().nbytes(shape, dtype)

    @staticmethod
    def composite(F, y, sigma):
        n = torch.randn_like(y, dtype=torch.float32)
        net_in = (PRECOND.c_in(_col(sigma)) * (y.float() + _col(sigma) * n)).to(y.dtype)
        return net_in, Loss.composite(F, y, sigma, n)

    def eager(self, i, fn=None):
        net_in, loss = (fn or self.composite)(i["F"], i["y"], i["sigma"])
        loss.backward()
        i["F"].grad = None
        return net_in

    def fused(self, i, backend):
        net_in = ops.perturb(i["y"], i["sigma"], PRECOND, seed=i["seed"], backend=backend)
        super().fused(i, backend)
        return net_in


class Churn(Op):
    name = "churn"
    doc = "read x (fp32), write x_hat (fp32), net_in"

    def inputs(self, shape, dtype, device, g):
        B = shape[0]
        return dict(x=torch.randn(shape, generator=g).to(device) * 5, t=torch.full((B,), 5.0, device=device),
                    th=torch.full((B,), 5.5, device=device), seed=1, dtype=dtype)

    def nbytes(self, shape, dtype):
        return math.prod(shape) * (8 + dtype.itemsize)

    def eager(self, i):
        t, th = _col(i["t"]), _col(i["th"])
        x_hat = i["x"] + (th**2 - t**2).sqrt() * torch.randn_like(i["x"])
        return x_hat, (PRECOND.c_in(th) * x_hat).to(i["dtype"])

    def fused(self, i, backend):
        return ops.churn(i["x"], i["t"], i["th"], PRECOND, seed=i["seed"], net_dtype=i["dtype"], backend=backend)


class Euler(Op):
    name = "euler step"
    doc = "read x (fp32), F; write x_next, d (fp32), net_in"

    def inputs(self, shape, dtype, device, g):
        B = shape[0]
        return dict(x=torch.randn(shape, generator=g).to(device) * 5,
                    F=torch.randn(shape, generator=g).to(device, dtype), d=torch.randn(shape, generator=g).to(device),
                    t=torch.full((B,), 5.0, device=device), tn=torch.full((B,), 3.0, device=device), dtype=dtype)

    def nbytes(self, shape, dtype):
        return math.prod(shape) * (12 + 2 * dtype.itemsize)

    def eager(self, i):
        t, tn, x = _col(i["t"]), _col(i["tn"]), i["x"]
        D = PRECOND.c_skip(t) * x + PRECOND.c_out(t) * i["F"].float()
        d = (x - D) / t
        x_next = x + (tn - t) * d
        return x_next, d, (PRECOND.c_in(tn) * x_next).to(i["dtype"])

    def fused(self, i, backend):
        return ops.euler_step(i["x"], i["F"], i["t"], i["tn"], PRECOND, net_dtype=i["dtype"], backend=backend)


class Heun(Euler):
    name = "heun step"
    doc = "read x, d (fp32), F; write x_next (fp32), net_in"

    def nbytes(self, shape, dtype):
        return math.prod(shape) * (12 + 2 * dtype.itemsize)

    def eager(self, i):
        t, tn, x, d = _col(i["t"]), _col(i["tn"]), i["x"], i["d"]
        h = tn - t
        x_eul = x + h * d
        D2 = PRECOND.c_skip(tn) * x_eul + PRECOND.c_out(tn) * i["F"].float()
        d2 = (x_eul - D2) / tn
        x_next = x + h * (0.5 * d + 0.5 * d2)
        return x_next, (PRECOND.c_in(tn) * x_next).to(i["dtype"])

    def fused(self, i, backend):
        return ops.heun_step(i["x"], i["d"], i["F"], i["t"], i["tn"], PRECOND, net_dtype=i["dtype"], backend=backend)


OPS = {"perturb": Perturb(), "loss": Loss(), "perturb+loss": PerturbLoss(), "churn": Churn(), "euler": Euler(),
       "heun": Heun()}


# ----------------------------------------------------------------------------------------------


def _minor_faults() -> int:
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rotating(sets):
    """A zero-argument caller factory that cycles through input sets on every call."""
    state = {"k": 0}

    def wrap(f):
        def call():
            i = sets[state["k"] % len(sets)]
            state["k"] += 1
            return f(i)
        return call
    return wrap


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS), help="ops to time (default: all)")
    ap.add_argument("--sizes", nargs="+", default=["cifar", "ffhq64"], choices=list(SIZES),
                    help="cifar 512x3x32x32, b64 64x3x64x64, ffhq64 256x3x64x64 (default: cifar ffhq64)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES),
                    help="network dtypes of the inputs and outputs (default: fp32 bf16)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device to time on (default cuda when there is one, else cpu)")
    ap.add_argument("--backends", nargs="*", default=None,
                    help="fused backends to time (default: every available one except the torch reference)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (saves compile time)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per row (default: 50 on GPU, 5 on CPU)")
    ap.add_argument("--malloc", choices=["steady", "default"], default="steady",
                    help="CPU only: 'steady' (default) keeps freed blocks in glibc's heap so no row pays page "
                         "faults for its fresh outputs; 'default' leaves glibc as it is (rows then depend on "
                         "what ran before them)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--time-budget", type=float, default=None, metavar="S",
                    help="seconds this run may take: after S - 5 no new op/size/dtype group, implementation or "
                         "timing round starts, and the table says what was left out (for a caller with a hard "
                         "limit, e.g. benchmarks/gpu_check.sh)")
    add_results_arg(ap)
    args = ap.parse_args(argv)
    check_outputs(ap, args)
    if args.time_budget is not None and args.time_budget <= 0:
        ap.error(f"--time-budget: expected a positive number of seconds, got {args.time_budget}")
    deadline = deadline_after(None if args.time_budget is None else args.time_budget - 5)  # 5 s: table, files

    def late() -> bool:
        return deadline is not None and time.perf_counter() >= deadline

    device = torch.device(args.device)
    heap = steady_heap() if device.type == "cpu" and args.malloc == "steady" else None
    reps = args.reps or (50 if device.type == "cuda" else 5)
    ops.set_value_checks(False)  # no device syncs for argument values inside the timed loop
    avail = [b for b in ops.available_backends(device) if b != "torch"]
    if device.type == "cpu":
        avail = [b for b in avail if b != "triton"]  # the interpreter is not a performance path
    backends = avail if args.backends is None else args.backends
    for b in backends:
        ops.select_backend(device, b)  # a clear error now if one is not available

    machine = machine_name(device)
    bw = copy_bandwidth(device)
    cache = cache_bytes(device)
    print(f"{machine}\nmeasured copy bandwidth: {bw / 1e9:.1f} GB/s (read+write); rotating inputs over "
          f">= 3x {cache / 2**20:.0f} MiB of cache" + (f"\n{heap}" if heap else "") + "\n")
    cuda = device.type == "cuda"
    # GB/s, % copy BW and the ratios come from the device time (CUDA-graph replay) on a GPU, from the
    # per-call time on a CPU (where host and device are one)
    header = ["op", "shape", "dtype", "impl", "call ms", "device ms", "GB/s", "% copy BW", "vs eager", "vs compile",
              "first call s"]
    rows, records, faults, left_out = [], [], [], []
    g = torch.Generator().manual_seed(0)
    for op_name in args.ops:
        op = OPS[op_name]
        for size in args.sizes:
            shape = SIZES[size]
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                group = f"{op.name} {'x'.join(map(str, shape))} {dname}"
                if late():
                    left_out.append(f"{group} (all)")
                    continue
                nbytes = op.nbytes(shape, dtype)
                # enough input sets to span 3x the last-level cache, within 2 GiB of buffers
                nsets = max(1, min(math.ceil(3 * cache / nbytes), (2 << 30) // nbytes))
                sets = [op.inputs(shape, dtype, device, g) for _ in range(nsets)]
                rot = rotating(sets)
                impls = [("eager", rot(op.eager))]
                if not args.no_compile:
                    impls.append(("compile", rot(op.compiled())))
                impls += [(b, rot(lambda i, b=b: op.fused(i, b))) for b in backends]
                bufs = [(torch.empty(nbytes // 2, dtype=torch.uint8, device=device).fill_(1),
                         torch.zeros(nbytes // 2, dtype=torch.uint8, device=device)) for _ in range(nsets)]
                impls.append(("copy", rotating(bufs)(lambda b: b[1].copy_(b[0]))))
                # every input set is touched before timing; calls of all implementations interleave
                n_reps, n_warm = max(reps, nsets), nsets + 1
                flt0 = _minor_faults()
                info = {}
                timed = time_interleaved(dict(impls), device, reps=n_reps, warmup=n_warm, deadline=deadline,
                                         info=info)
                # per call: the first (timed apart), the warm-up rounds and the timed rounds, of every impl
                faults.append((_minor_faults() - flt0) / ((1 + n_warm + n_reps) * len(impls)))
                missing = [k for k, _ in impls if k not in timed]
                if "eager" not in timed:  # nothing to hold the others against
                    left_out.append(f"{group} (all)")
                    del sets, bufs
                    continue
                if missing:
                    left_out.append(f"{group} ({', '.join(missing)})")
                if info.get("rounds", n_reps) < n_reps:
                    left_out.append(f"{group}: {info['rounds']} of {n_reps} timed rounds")
                impls = [(k, f) for k, f in impls if k in timed]
                graphed = cuda and not late()
                if cuda and not graphed:
                    left_out.append(f"{group}: device time (ratios from call time)")
                dev = time_graphed(dict(impls), device, calls=nsets) if graphed else {}
                best = {k: dev.get(k) or timed[k][0] for k, _ in impls}
                for impl, _ in impls:
                    t_call, first = timed[impl]
                    t = best[impl]
                    row = [op.name, "x".join(map(str, shape)), dname, impl, f"{t_call * 1e3:.3f}",
                           f"{dev[impl] * 1e3:.4f}" if dev.get(impl) else ("n/a" if cuda else "-"),
                           f"{nbytes / t / 1e9:.1f}", f"{100 * nbytes / t / bw:.0f}%", f"{best['eager'] / t:.2f}x",
                           f"{best['compile'] / t:.2f}x" if "compile" in best else "-", f"{first:.2f}"]
                    rows.append(row)
                    records.append(dict(zip(header, row)))
                    if len(rows) == 1:
                        print(" | ".join(f"{c:>12}" if k else f"{c:<12}" for k, c in enumerate(header)))
                    print(" | ".join(f"{c:>12}" if k else f"{c:<12}" for k, c in enumerate(row)), flush=True)
                del sets, bufs
    print()
    notes = [f"Machine: {machine}", f"Command: `python benchmarks/ops_bandwidth.py {' '.join(argv or sys.argv[1:])}`",
             "call ms: one call at a time, host work included (Python, checks, launches); device ms: the same calls "
             "replayed from a CUDA graph (GPU only), from which GB/s, % copy BW and the ratios are computed"
             if cuda else "call ms: one call at a time (GB/s, % copy BW and the ratios from it)",
             f"Measured copy bandwidth: {bw / 1e9:.1f} GB/s; precond fdm_edm; bytes per op: "
             + "; ".join(f"{o.name}: {o.doc}" for o in (OPS[n] for n in args.ops))]
    if heap:
        notes.append(heap[0].upper() + heap[1:])
    if left_out:
        notes.append(f"Not measured within --time-budget {args.time_budget:g} s: " + "; ".join(left_out))
        print(notes[-1])
    if device.type == "cpu" and faults:
        notes.append(f"Page faults per call, warm-up included, worst row: {max(faults):.1f} "
                     "(a fault-free heap reads ~0; a few MB of fresh pages is ~1,500)")
        print(notes[-1])
    if args.results:
        append_results("ops_bandwidth", header, rows, notes, path=args.results)
        print(f"appended {len(rows)} rows to {args.results}")
    if args.json:
        write_json(args.json, dict(machine=machine, copy_bw=bw, rows=records, left_out=left_out))


if __name__ == "__main__":
    main()
