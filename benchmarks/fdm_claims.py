"""Does FDM train and sample faster? The paper's three checks, at small scale, on the embedded digits.

  E1  training speed: EDM vs FDM-EDM and VP vs FDM-VP (add VE vs FDM-VE with --arms), several seeds
      per arm; quality (digits FD of the EMA network, lower is better) vs training kimg, mean and 95%
      interval over seeds; "kimg for the FDM arm to reach its baseline's final quality" and the ratio,
      with a bootstrap interval over seeds.
  E2  momentum strength: FDM-EDM with fdm_multiplier m in {0.5, 1, 2, 4} (warm-up on, the recipe), and
      m = 2 with the loss-weight warm-up off (--e2-full: every m without warm-up too): quality vs kimg
      and loss spikes (a tick's mean loss above 3x the median of the ticks before).
  E3  sampling steps: quality vs NFE (Heun, Euler, DPM-Solver++(2M)) for the first seed's final model
      of every E1 arm: does FDM need fewer steps for the same quality?

Each run is `python -m fdm_fast.train --ds digits` with the digits recipe (batch 64, the network of
the README's main job), its seed and the arm's preconditioning, driven through train.setup and
train.train_step; quality is fdm_fast.metrics.evaluate.SampleEvaluator("digits-fd") on a fixed seed
set. Every number is reproducible from the seeds. The default protocol was sized to finish within an
hour on a 2-core CPU (the measured time is printed and recorded); --quick is a smoke run of minutes
(the tests run it); the flags scale it up.

    python benchmarks/fdm_claims.py                         # prints tables; writes nothing
    python benchmarks/fdm_claims.py --out docs/fdm_claims --results   # JSON + PNGs + RESULTS.md sections
    python benchmarks/fdm_claims.py --quick --out /tmp/claims
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (add_results_arg, append_results, check_outputs, machine_name, print_table,  # noqa: E402
                      write_json)

from fdm_fast import train  # noqa: E402
from fdm_fast.metrics.evaluate import SampleEvaluator  # noqa: E402
from fdm_fast.plots import subplots  # noqa: E402

PAIRS = {"edm": ("edm", "fdm_edm"), "vp": ("vp", "fdm_vp"), "ve": ("ve", "fdm_ve")}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(xs):
    """Mean and the 95% Student-t interval over seeds (the mean alone for one seed)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan"), float("nan")
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, m, m
    h = T975.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - h, m + h


def reach_kimg(kimg, values, target):
    """The first kimg at which ``values`` (one per kimg point) reaches <= target, linearly interpolated
    between evaluation points; None when it never does."""
    prev = None
    for k, v in zip(kimg, values):
        if v <= target:
            if prev is None:
                return k
            k0, v0 = prev
            return k0 + (k - k0) * (v0 - target) / (v0 - v) if v0 != v else k
        prev = (k, v)
    return None


def train_arm(precond, seed, args, evaluator, *, multiplier=None, warmup=None, label=""):
    """One training run; quality of the EMA network every --eval-every kimg and loss per tick."""
    tmp = tempfile.mkdtemp(prefix="fdm_claims_")
    flags = ["--ds", "digits", "--precond", precond, "--seed", str(seed), "--kimg", str(args.kimg),
             "--no-compile", "--outdir", tmp]
    if multiplier is not None:
        flags += ["--fdm-multiplier", str(multiplier)]
    if warmup is not None:
        flags += ["--warmup-ite", str(warmup)]
    o = train.resolve(train.parse_args(flags))
    torch.manual_seed(seed)
    run = train.setup(o, device=torch.device("cpu"))
    total = int(args.kimg * 1000)
    every, tick = int(args.eval_every * 1000), max(o.batch, int(args.tick * 1000))
    next_eval, next_tick = every, tick
    curve, losses, acc, n = [], [], 0.0, 0
    t0 = time.time()
    while run.cur_nimg < total:
        acc += float(train.train_step(run))
        n += run.batch_gpu_total
        if run.cur_nimg >= next_tick or run.cur_nimg >= total:
            losses.append(dict(kimg=run.cur_nimg / 1000, loss=acc / max(n, 1)))
            acc, n = 0.0, 0
            next_tick += tick
        if run.cur_nimg >= next_eval or run.cur_nimg >= total:
            rec = evaluator(run.ema)
            curve.append(dict(kimg=run.cur_nimg / 1000, fd=rec["fd"], kid=rec["kid"], precision=rec["precision"],
                              recall=rec["recall"], classes_seen=rec["classes_seen"]))
            print(f"  {label or precond} seed {seed}: {run.cur_nimg / 1000:6.2f} kimg, FD {rec['fd']:8.2f}, "
                  f"loss {losses[-1]['loss']:.4g}", flush=True)
            while next_eval <= run.cur_nimg:
                next_eval += every
    shutil.rmtree(tmp, ignore_errors=True)
    spikes, worst = 0, 1.0
    ls = [r["loss"] for r in losses]
    for i in range(3, len(ls)):
        med = statistics.median(ls[:i])
        worst = max(worst, ls[i] / med if med > 0 else 1.0)
        spikes += ls[i] > 3 * med
    return dict(precond=precond, seed=seed, multiplier=multiplier, warmup=o.warmup_ite, curve=curve, losses=losses,
                spikes=spikes, worst_loss_ratio=worst, train_seconds=time.time() - t0, ema=run.ema)


def summarize(runs):
    """Mean and interval of FD per kimg point over an arm's seeds."""
    kimg = [c["kimg"] for c in runs[0]["curve"]]
    rows = [mean_ci([r["curve"][i]["fd"] for r in runs]) for i in range(len(kimg))]
    return dict(kimg=kimg, mean=[m for m, _, _ in rows], lo=[lo for _, lo, _ in rows], hi=[hi for _, _, hi in rows])


def speedup(base_runs, fdm_runs, boot=1000, seed=0):
    """kimg for FDM's mean curve to reach the baseline's final mean FD, the ratio of the baseline's
    length to it, and a bootstrap 95% interval of that ratio over seeds (resampled in each arm)."""
    def ratio(b, f):
        kimg = [c["kimg"] for c in b[0]["curve"]]
        target = statistics.fmean(r["curve"][-1]["fd"] for r in b)
        fmean = [statistics.fmean(r["curve"][i]["fd"] for r in f) for i in range(len(kimg))]
        k = reach_kimg(kimg, fmean, target)
        return target, k, (kimg[-1] / k if k else None)

    target, k, r = ratio(base_runs, fdm_runs)
    rng = np.random.default_rng(seed)
    rs = []
    for _ in range(boot if len(base_runs) > 1 else 0):
        b = [base_runs[i] for i in rng.integers(0, len(base_runs), len(base_runs))]
        f = [fdm_runs[i] for i in rng.integers(0, len(fdm_runs), len(fdm_runs))]
        rr = ratio(b, f)[2]
        rs.append(rr if rr is not None else 0.0)  # never reached: ratio below any measured one
    lo, hi = (float(np.percentile(rs, 2.5)), float(np.percentile(rs, 97.5))) if rs else (None, None)
    never = sum(x == 0.0 for x in rs)
    return dict(target_fd=target, fdm_kimg=k, ratio=r, ratio_lo=lo, ratio_hi=hi,
                never_reached_frac=never / max(len(rs), 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run of about a minute (1 seed, 0.384 kimg, "
                                                        "tiny evaluations); what the tests run")
    ap.add_argument("--experiments", nargs="+", default=["E1", "E2", "E3"], choices=["E1", "E2", "E3"],
                    help="E1 training speed, E2 momentum strength and warm-up, E3 quality vs NFE (default: all)")
    ap.add_argument("--arms", nargs="+", default=["edm", "vp"], choices=list(PAIRS),
                    help="E1's baseline/FDM pairs (default: edm vp; ve adds VE vs FDM-VE)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per E1 arm (default 3)")
    ap.add_argument("--kimg", type=float, default=24.0, help="training length of every run (default 24)")
    ap.add_argument("--eval-every", type=float, default=4.0, help="kimg between evaluations (default 4)")
    ap.add_argument("--tick", type=float, default=0.512, help="kimg per loss point for spike detection (default 0.512)")
    ap.add_argument("--eval-num", type=int, default=300, help="samples per evaluation (default 300)")
    ap.add_argument("--eval-steps", type=int, default=9,
                    help="Heun steps per evaluation (NFE 2 x steps - 1; default 9)")
    ap.add_argument("--multipliers", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0],
                    help="E2's fdm_multiplier values (default 0.5 1 2 4; 2 is FDM-EDM's default)")
    ap.add_argument("--e2-full", action="store_true", help="E2: every multiplier with the warm-up off too "
                                                             "(default: m = 2 only)")
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 9, 17, 35], help="E3's NFE values (default 5 9 17 35)")
    ap.add_argument("--out", type=Path, help="write DIR/fdm_claims.json and the PNG plots (default: print only)")
    ap.add_argument("--replot", type=Path, metavar="JSON", help="only redraw the PNGs of a finished run's "
                                                                "fdm_claims.json (beside it, or in --out)")
    add_results_arg(ap)
    args = ap.parse_args(argv)
    check_outputs(ap, args)
    if args.replot:
        try:
            result = json.loads(args.replot.read_text())
        except (OSError, ValueError) as e:
            ap.error(f"--replot {args.replot}: not a readable fdm_claims.json ({e})")
        saved = argparse.Namespace(**{**result["args"], "out": args.out or args.replot.parent})
        saved.out.mkdir(parents=True, exist_ok=True)
        plots(result, saved)
        print(f"plots redrawn in {saved.out}")
        return
    if args.quick:
        args.seeds, args.kimg, args.eval_every, args.tick = 1, 0.384, 0.192, 0.064
        args.eval_num, args.eval_steps, args.multipliers, args.nfe = 40, 2, [1.0, 2.0], [3, 5]
    for flag, v, ok in (("--seeds", args.seeds, args.seeds >= 1), ("--kimg", args.kimg, args.kimg > 0),
                        ("--eval-every", args.eval_every, 0 < args.eval_every <= args.kimg),
                        ("--eval-num", args.eval_num, args.eval_num >= 2), ("--eval-steps", args.eval_steps,
                                                                            args.eval_steps >= 1)):
        if not ok:
            ap.error(f"{flag}: out of range, got {v}")
    if any(n < 2 for n in args.nfe):
        ap.error(f"--nfe: expected values >= 2, got {args.nfe}")

    t_start = time.time()
    evaluator = SampleEvaluator("digits-fd", num=args.eval_num, steps=args.eval_steps, log=print)
    print(f"{machine_name(torch.device('cpu'))}; digits classifier test accuracy {evaluator.scorer.accuracy:.3f}; "
          f"evaluation: {args.eval_num} samples, Heun NFE {evaluator.nfe}\n", flush=True)
    result = dict(machine=machine_name(torch.device("cpu")), args={k: (str(v) if isinstance(v, Path) else v)
                                                                   for k, v in vars(args).items()})
    e1 = {}
    if "E1" in args.experiments or "E3" in args.experiments:
        for pair in args.arms:
            for precond in PAIRS[pair]:
                e1[precond] = [train_arm(precond, s, args, evaluator) for s in range(args.seeds)]
    tables = []
    if "E1" in args.experiments:
        rows, res = [], {}
        for pair in args.arms:
            base, fdm = PAIRS[pair]
            sp = speedup(e1[base], e1[fdm])
            res[pair] = dict(baseline=summarize(e1[base]), fdm=summarize(e1[fdm]), **sp)
            for p in (base, fdm):
                s = summarize(e1[p])
                rows.append([p, *[f"{m:.1f} [{lo:.1f}, {hi:.1f}]" for m, lo, hi in zip(s["mean"], s["lo"], s["hi"])]])
        header = ["arm: FD at kimg, mean [95% CI]", *[f"{k:g}" for k in res[args.arms[0]]["fdm"]["kimg"]]]
        tables.append((f"fdm_claims E1: training speed, FD vs kimg ({args.seeds} seeds per arm)", header, rows))
        fmt = (lambda v, f="{:.2f}": "never" if v is None else f.format(v))
        tables.append(("fdm_claims E1: kimg for the FDM arm to reach its baseline's final FD",
                       ["pair", "baseline's final FD", "FDM reaches it at kimg", "speed-up (baseline kimg / that)",
                        "95% bootstrap CI over seeds", "resamples never reaching it"],
                       [[f"{PAIRS[pair][0]} -> {PAIRS[pair][1]}", f"{r['target_fd']:.1f}", fmt(r["fdm_kimg"]),
                         fmt(r["ratio"], "{:.2f}x"), f"[{fmt(r['ratio_lo'])}, {fmt(r['ratio_hi'])}]",
                         f"{100 * r['never_reached_frac']:.0f}%"] for pair, r in res.items()]))
        result["E1"] = dict(res, runs={p: [{k: v for k, v in r.items() if k != "ema"} for r in rs]
                                       for p, rs in e1.items()})
    if "E2" in args.experiments:
        e2 = []
        for warm in (None, 0):
            for m in args.multipliers:
                if warm == 0 and not args.e2_full and m != 2.0:
                    continue
                reuse = (warm is None and m == 2.0 and "fdm_edm" in e1)
                label = f"fdm_edm m={m:g} warm-up {'on' if warm is None else 'off'}"
                r = e1["fdm_edm"][0] if reuse else train_arm("fdm_edm", 0, args, evaluator, multiplier=m, warmup=warm,
                                                             label=label)
                e2.append({k: v for k, v in r.items() if k != "ema"} | dict(multiplier=m, warmup_on=warm is None))
        rows = [[f"m={r['multiplier']:g}, warm-up {'on' if r['warmup_on'] else 'off'}",
                 *[f"{c['fd']:.1f}" for c in r["curve"]], str(r["spikes"]), f"{r['worst_loss_ratio']:.2f}"] for r in e2]
        header = ["fdm_edm (seed 0)", *[f"FD@{c['kimg']:g}" for c in e2[0]["curve"]], "loss spikes",
                  "worst loss/median"]
        tables.append(("fdm_claims E2: momentum strength and warm-up", header, rows))
        result["E2"] = e2
    if "E3" in args.experiments:
        e3, rows = [], []
        for pair in args.arms:
            for precond in PAIRS[pair]:
                ema = e1[precond][0]["ema"]
                for sampler in ("heun", "euler", "dpm2m"):
                    row = [precond, sampler]
                    for nfe in args.nfe:
                        if sampler == "heun" and nfe % 2 == 0:
                            row.append("-")
                            continue
                        steps = (nfe + 1) // 2 if sampler == "heun" else nfe
                        ev = SampleEvaluator("digits-fd", num=args.eval_num, steps=steps, sampler=sampler,
                                             scorer=evaluator.scorer)
                        fd_v = ev(ema)["fd"]
                        e3.append(dict(precond=precond, sampler=sampler, nfe=nfe, fd=fd_v))
                        row.append(f"{fd_v:.1f}")
                    rows.append(row)
                    print(f"  E3 {precond} {sampler}: " + ", ".join(row[2:]), flush=True)
        tables.append(("fdm_claims E3: quality vs NFE (seed 0's final model)",
                       ["arm", "sampler", *[f"FD@NFE {n}" for n in args.nfe]], rows))
        result["E3"] = e3
    result["seconds"] = time.time() - t_start
    print()
    for title, header, rows in tables:
        print(title)
        print_table(header, rows)
        print()
    print(f"total time: {result['seconds'] / 60:.1f} min")

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "fdm_claims.json", result)
        plots(result, args)
        print(f"json and plots in {args.out}")
    if args.results:
        notes = [f"Machine: {result['machine']}",
                 f"Command: `python benchmarks/fdm_claims.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
                 f"Total time {result['seconds'] / 60:.1f} min. FD: digits-classifier Fréchet distance of "
                 f"{args.eval_num} EMA samples (Heun NFE {2 * args.eval_steps - 1}) to the digits test split; lower "
                 f"is better; 450 real training images score 3.35 against the same split (tests/test_metrics.py, "
                 f"2026-11-29)"]
        for title, header, rows in tables:
            append_results(title, header, rows, notes, path=args.results)
        print(f"appended {len(tables)} tables to {args.results}")


def plots(result, args):
    panels = []
    if "E1" in result:
        for pair in args.arms:
            series = []
            for k, key in enumerate(("baseline", "fdm")):
                s = result["E1"][pair][key]
                series.append(dict(x=s["kimg"], y=s["mean"], lo=s["lo"], hi=s["hi"], color=k,
                                   label=PAIRS[pair][k] + f" ({args.seeds} seeds)"))
            panels.append(dict(series=series, title=f"E1: {PAIRS[pair][0]} vs {PAIRS[pair][1]}, FD vs kimg "
                                                    f"(mean, 95% CI)", xlabel="training kimg", ylabel="FD"))
        subplots(str(args.out / "fdm_claims_e1.png"), panels, cols=len(panels))
    if "E2" in result:
        series = [dict(x=[c["kimg"] for c in r["curve"]], y=[c["fd"] for c in r["curve"]], color=k,
                       label=f"m={r['multiplier']:g} wu {'on' if r['warmup_on'] else 'off'}")
                  for k, r in enumerate(result["E2"])]
        losses = [dict(x=[c["kimg"] for c in r["losses"]], y=[c["loss"] for c in r["losses"]], color=k,
                       label=f"m={r['multiplier']:g} wu {'on' if r['warmup_on'] else 'off'}")
                  for k, r in enumerate(result["E2"])]
        subplots(str(args.out / "fdm_claims_e2.png"), [
            dict(series=series, title="E2: fdm_edm FD vs kimg by multiplier m and warm-up", xlabel="training kimg",
                 ylabel="FD"),
            dict(series=losses, title="E2: training loss per tick", xlabel="training kimg", ylabel="loss", logy=True)])
    if "E3" in result:
        panels = []
        for sampler in ("heun", "euler", "dpm2m"):
            series = []
            for k, precond in enumerate(p for pair in args.arms for p in PAIRS[pair]):
                pts = [r for r in result["E3"] if r["precond"] == precond and r["sampler"] == sampler]
                series.append(dict(x=[r["nfe"] for r in pts], y=[r["fd"] for r in pts], color=k, label=precond))
            panels.append(dict(series=series, title=f"E3: FD vs NFE, {sampler}", xlabel="NFE", ylabel="FD",
                               logx=True, logy=True))
        subplots(str(args.out / "fdm_claims_e3.png"), panels, cols=3)


if __name__ == "__main__":
    main()
