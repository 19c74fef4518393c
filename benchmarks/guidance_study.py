"""Does guidance do what it should on a real model? Classifier-free guidance and autoguidance on a
class-conditional digits model, scored offline by the digits classifier (fdm_fast.metrics.digits).

For each guidance weight w, ``--num`` samples with labels cycling over the 10 classes (seeds 0..num-1,
the same for every row) are drawn with ``--solver`` at ``--steps``, and scored by
  label accuracy  the share of samples the classifier reads as the label they were asked for
  digits FD       the Frechet distance of the classifier's features to the digits test split
Rows: classifier-free guidance (the guide is the same network with the label dropped; the model must
be trained with ``--cond --cond-drop P``) at each w, w = 0 being the unconditional model alone; and,
with ``--guide-network`` (e.g. an earlier snapshot of the same run), autoguidance at each w.

    python -m fdm_fast.train --ds digits --cond --cond-drop 0.1 --kimg 40 --outdir runs/digits-cond
    python benchmarks/guidance_study.py --network runs/digits-cond/network-snapshot-000040.pt \\
        --guide-network runs/digits-cond/network-snapshot-000008.pt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (add_results_arg, append_results, check_outputs, machine_name, print_table,  # noqa: E402
                      write_json)

from fdm_fast import solvers  # noqa: E402
from fdm_fast.metrics.digits import DigitsMetrics  # noqa: E402
from fdm_fast.snapshots import SnapshotError, load_snapshot  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", required=True, help="a class-conditional digits snapshot (trained with --cond-drop)")
    ap.add_argument("--guide-network", default=None, help="a weaker snapshot of the same task: autoguidance rows")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 1.5, 2.0, 3.0, 4.0],
                    help="guidance weights w, one row each (1 = unguided; default 0 1 1.5 2 3 4)")
    ap.add_argument("--solver", default="dpm++2m", choices=list(solvers.SOLVERS), help="solver (default dpm++2m)")
    ap.add_argument("--steps", type=int, default=10, help="solver steps (default 10)")
    ap.add_argument("--num", type=int, default=500, help="samples per row (default 500)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    add_results_arg(ap)
    args = ap.parse_args(argv)
    check_outputs(ap, args)
    try:
        net = load_snapshot(args.network, "cpu")
    except SnapshotError as e:
        ap.error(f"--network {e}")
    if not net.label_dim:
        ap.error(f"--network {args.network}: not class-conditional (train with --cond --cond-drop P)")
    if net.img_channels != 1 or net.img_resolution != 16:
        ap.error(f"--network {args.network}: expected a 16x16x1 digits model")
    try:
        guide = load_snapshot(args.guide_network, "cpu") if args.guide_network else None
    except SnapshotError as e:
        ap.error(f"--guide-network {e}")
    metrics = DigitsMetrics()
    seeds = list(range(args.num))
    want = np.array(seeds) % net.label_dim
    labels = torch.eye(net.label_dim)[torch.as_tensor(want)]
    rows, records = [], []
    kinds = [("classifier-free", None)] + ([("autoguidance", guide)] if guide is not None else [])
    for kind, g in kinds:
        for w in args.weights:
            if kind == "autoguidance" and w == 0:
                continue  # the guide network alone: not a guidance setting
            t0 = time.time()
            x = solvers.sample(net, seeds, solver=args.solver, steps=args.steps, guidance=w, guide=g,
                               class_labels=labels, device="cpu")
            acc = float((metrics.classes(x) == want).mean())
            fd = metrics.evaluate(x)["fd"]
            rec = dict(kind=kind, w=w, label_accuracy=acc, fd=fd, seconds=time.time() - t0)
            records.append(rec)
            rows.append([kind, f"{w:g}", f"{acc:.3f}", f"{fd:.2f}", f"{rec['seconds']:.1f}"])
            print(f"  {kind} w={w:g}: label accuracy {acc:.3f}, FD {fd:.2f}", flush=True)
    header = ["guidance", "w", "label accuracy", "digits FD", "seconds"]
    machine = machine_name(torch.device("cpu"))
    print(machine)
    print_table(header, rows)
    notes = [f"Machine: {machine}", f"Command: `python benchmarks/guidance_study.py {' '.join(argv or sys.argv[1:])}`",
             f"{args.num} samples per row (labels cycling 0-9, seeds 0-{args.num - 1}), {args.solver} at {args.steps} "
             f"steps; label accuracy: the digits classifier (test accuracy {metrics.accuracy:.3f}) reads the asked "
             "label; w = 1: unguided; w = 0 (classifier-free): the unconditional branch alone"]
    if args.results:
        append_results("guidance_study", header, rows, notes, path=args.results)
    if args.json:
        write_json(args.json, dict(machine=machine, rows=records))


if __name__ == "__main__":
    main()
