"""The hot paths on a GPU under ``torch.cuda.set_sync_debug_mode("error")``: any host sync raises.

Runs a small digits training run (``train.setup`` + ``train.train_step``, the code ``python -m
fdm_fast.train`` runs) for a few warm-up steps (caches, cuDNN autotuning, pinned buffers), then
``--steps`` steps in sync-error mode; then every sampler (deterministic and stochastic Heun, Euler)
and every solver of fdm_fast.solvers once to warm up and once in sync-error mode. Exit status 0 only if nothing synced.
On a CPU-only machine it says so and exits 0 without checking (tests/test_sync_free.py is the CPU check).

    python benchmarks/sync_check.py [--steps 10] [--augment 0.12] [--backend triton|cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback

import torch

from fdm_fast import ops, sampling, solvers, train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="training steps checked in sync-error mode (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="training steps before the check (default 3)")
    ap.add_argument("--augment", type=float, default=0.0, help="augmentation probability (default 0)")
    ap.add_argument("--backend", default=None, help="fused-op backend (default: the dispatcher's choice)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network (slower to start)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup: expected positive integers")
    if not torch.cuda.is_available():
        print("sync_check: no CUDA device; nothing checked (the CPU check is tests/test_sync_free.py)")
        return 0
    device = torch.device("cuda", 0)
    failures = []

    def checked(name, fn):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            print(f"{name}: no sync")
        except Exception as e:  # noqa: BLE001 - report every failure, run the rest
            torch.cuda.set_sync_debug_mode(0)
            failures.append(name)
            print(f"{name}: FAILED ({type(e).__name__}: {e})")
            traceback.print_exc(limit=6)

    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--ds", "digits", "--batch", "64", "--outdir", tmp, "--augment", str(args.augment),
                 "--compile" if args.compile else "--no-compile", "--xflip"]
        if args.backend:
            flags += ["--backend", args.backend]
        o = train.resolve(train.parse_args(flags))
        run = train.setup(o, device=device)
        print(f"training: {o.precond} on {o.ds}, batch {o.batch}, backend {ops.select_backend(device, o.backend)}")
        for _ in range(args.warmup):
            train.train_step(run)

        def steps():
            for _ in range(args.steps):
                train.train_step(run)

        checked(f"train_step x{args.steps}", steps)
        net = run.ema
        seeds = torch.arange(16, device=device)
        for name, fn, kw in [("heun", sampling.edm_sampler, {}), ("heun S_churn=10", sampling.edm_sampler,
                                                                 dict(S_churn=10.0)),
                             ("euler", sampling.edm_sampler, dict(heun=False)),
                             *[(s, solvers.sample, dict(solver=s)) for s in solvers.SOLVERS]]:
            fn(net, seeds, num_steps=8, device=device, backend=o.backend, **kw)  # warm-up
            checked(f"sampler {name}", lambda: fn(net, seeds, num_steps=8, device=device, backend=o.backend, **kw))
    print("sync_check:", "all clear" if not failures else f"{len(failures)} FAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
