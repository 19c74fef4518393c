"""Sampler speed and NFE, in one run: ``python benchmarks/sampler_speed.py``.

Speed, for a SongUNet (random weights: speed does not depend on them) at each batch size and NFE:
  official      EDM's sampler as published: eager, float64 state, op-by-op, the net called through the
                preconditioning's forward
  fused         fdm_fast.sampling.edm_sampler: float32 state, fused step ops, eager UNet
  fused+compile the same with torch.compile of the UNet (compile time reported apart)
  fused+compile+graph   (CUDA) the whole sampling loop captured as one CUDA graph, replayed
  fused+compile+graph, bf16 net   (CUDA) the same with the network in bfloat16 (generate --precision bf16;
                the state stays float32): not the official numerics, the row a practitioner would use
  (--no-compile: official, fused and, on CUDA, fused+graph, the uncompiled UNet in the graph: no
  compile time, which a fresh machine pays on the first call, tens of seconds)
and the step overhead alone (a trivial denoiser, F = 0, at 64x3x64x64): official vs fused.

NFE (analytic): a Gaussian-mixture dataset whose ideal denoiser is known in closed form
(fdm_fast.gmm); for every solver of fdm_fast.solvers (``--solvers``, ``--schedule``) at each NFE (exact:
fdm_fast.solvers.nfe), the per-sample distance of the samples to a 500-step Heun solution from the
same noise (median, 90th percentile, samples that switched mixture component) and the error of the
samples' mean and covariance against the mixture's. With ``--network SNAP --ref REF.npz --inception
WEIGHTS``: FID vs NFE per solver for that trained snapshot.

Writes a table to stdout, JSON and a PNG plot (Pillow) into --out, and rows to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (add_results_arg, append_results, check_outputs, deadline_after, machine_name,  # noqa: E402
                      print_table, time_interleaved, write_json)

from fdm_fast import ops  # noqa: E402
from fdm_fast.gmm import GaussianMixtureDenoiser  # noqa: E402
from fdm_fast.nn import build_denoiser, count_parameters  # noqa: E402
from fdm_fast.plots import subplots  # noqa: E402
from fdm_fast import solvers  # noqa: E402
from fdm_fast.sampling import GraphedSampler, edm_sampler, seed_labels  # noqa: E402
from fdm_fast.schedules import PRECONDS, edm_time_steps  # noqa: E402


@torch.no_grad()
def official_sampler(net, latents, num_steps, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0):
    """EDM's generate.py edm_sampler: float64 state, op by op."""
    t_steps = edm_time_steps(num_steps, precond=net.precond, dtype=torch.float64, device=latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * torch.randn_like(x_cur)
        denoised = net(x_hat, t_hat).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


class Zero(torch.nn.Module):
    """A trivial network (F = 0): what remains is the sampler's own per-step work."""

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        return torch.zeros_like(x)


def _graphed(net, seeds, steps, **options):
    """A variant that samples ``seeds`` with a GraphedSampler, captured on its first call (timed apart)."""
    holder = {}

    def run():
        if "g" not in holder:
            holder["g"] = GraphedSampler(net, len(seeds), num_steps=steps, **options)
        return holder["g"](seeds)
    return run


def speed(args, device):
    rows = []
    if args.preset == "ffhq64" or (args.preset == "auto" and device.type == "cuda"):
        cfg = dict(precond=args.precond, arch="ddpmpp", img_resolution=64, img_channels=3,
                   network=dict(channel_mult=(1, 2, 2, 2)))
    else:
        cfg = dict(precond=args.precond, arch="ddpmpp", img_resolution=16, img_channels=1,
                   network=dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,)))
    torch.manual_seed(0)
    net = build_denoiser(cfg).to(device).eval().requires_grad_(False)
    compiled = None
    if not args.no_compile:
        compiled = build_denoiser(cfg).to(device).eval().requires_grad_(False)
        compiled.load_state_dict(net.state_dict())
        compiled.model = torch.compile(compiled.model)
    desc = f"{cfg['img_resolution']}x{cfg['img_resolution']}x{cfg['img_channels']} DDPM++ " \
           f"({count_parameters(net.model) / 1e6:.1f}M)"
    for batch in args.batch:
        for nfe in args.nfe:
            steps = (nfe + 1) // 2
            seeds = list(range(batch))
            shape = (batch, cfg["img_channels"], cfg["img_resolution"], cfg["img_resolution"])
            variants = {
                "official": lambda: official_sampler(net, torch.randn(shape, device=device), steps),
                "fused": lambda: edm_sampler(net, seeds, num_steps=steps, device=device),
            }
            if compiled is None and device.type == "cuda":  # --no-compile: the graph of the eager UNet
                variants["fused+graph"] = _graphed(net, seeds, steps)
            if compiled is not None:
                variants["fused+compile"] = lambda: edm_sampler(compiled, seeds, num_steps=steps, device=device)
            if compiled is not None and device.type == "cuda":  # the whole loop as one CUDA graph (captured once)
                variants["fused+compile+graph"] = _graphed(compiled, seeds, steps)
                # generate --precision bf16
                variants["fused+compile+graph, bf16 net"] = _graphed(compiled, seeds, steps, net_dtype=torch.bfloat16)
            print(f"batch {batch}, NFE {2 * steps - 1}:", flush=True)
            timed = time_interleaved(variants, device, reps=args.reps, warmup=0, log=lambda m: print(m, flush=True),
                                     deadline=args.deadline, info=(info := {}))
            for name, (t, first) in timed.items():
                rows.append(dict(kind="speed", network=desc, batch=batch, nfe=2 * steps - 1, variant=name,
                                 seconds=t, img_per_s=batch / t, ms_per_nfe=1e3 * t / (2 * steps - 1),
                                 first_call_s=first, reps=info.get("rounds", 0)))
    # step overhead with a trivial network at 64x3x64x64
    triv = build_denoiser(dict(cfg, img_resolution=64, img_channels=3, network=dict(cfg["network"], channel_mult=(1,))))
    triv.model = Zero()
    triv = triv.to(device)
    batch, steps = 64, 18
    timed = time_interleaved({
        "official": lambda: official_sampler(triv, torch.randn(batch, 3, 64, 64, device=device), steps),
        "fused": lambda: edm_sampler(triv, list(range(batch)), num_steps=steps, device=device)}, device,
        reps=args.reps, warmup=0, deadline=args.deadline, info=(info := {}))
    for name, (t, first) in timed.items():
        rows.append(dict(kind="overhead", network="F = 0 (sampler only), 64x3x64x64", batch=batch, nfe=2 * steps - 1,
                         variant=name, seconds=t, img_per_s=batch / t, ms_per_nfe=1e3 * t / (2 * steps - 1),
                         first_call_s=first, reps=info.get("rounds", 0)))
    return rows


def _steps_for(solver: str, nfe: int, afs: bool = False) -> int:
    """The steps whose NFE is closest to ``nfe`` from below (heun: 2 steps - 1, the others: steps; the analytic
    first step saves one)."""
    if afs:
        return max(2, (nfe + 2) // 2) if solver == "heun" else max(2, nfe + 1)
    return max(1, (nfe + 1) // 2) if solver == "heun" else nfe


def nfe_analytic(args):
    rows = []
    gmm = GaussianMixtureDenoiser.random(k=6, shape=(3, 4, 4), seed=3, precond=args.precond, spread=1.0)
    seeds = list(range(args.nfe_samples))
    ref = edm_sampler(gmm, seeds, num_steps=500, device="cpu").double()
    ref_comp = gmm.component(ref)
    m, cov = gmm.moments()
    for solver in args.solvers:
        for steps in sorted({_steps_for(solver, n, args.afs) for n in args.nfe}):
            x = solvers.sample(gmm, seeds, solver=solver, steps=steps, schedule=args.schedule, device="cpu",
                               afs=args.afs).double()
            flat = x.reshape(len(seeds), -1)
            # per-sample RMS error: the median and 90th percentile are not dominated by the few samples
            # that end near another component than the reference trajectory (counted apart)
            per = (x - ref).reshape(len(seeds), -1).pow(2).mean(1).sqrt()
            rows.append(dict(kind="nfe", sampler=solver + _AFS[args.afs], schedule=args.schedule,
                             nfe=solvers.nfe(solver, steps, args.afs),
                             median_err=per.median().item(), p90_err=per.quantile(0.9).item(),
                             switched=int((gmm.component(x) != ref_comp).sum()),
                             rms_to_reference=(x - ref).pow(2).mean().sqrt().item(),
                             mean_err=(flat.mean(0) - m).norm().item(),
                             cov_err=(torch.cov(flat.T) - cov).norm().item() / cov.norm().item()))
    return rows


_AFS = {False: "", True: "+afs"}  # how a row names the analytic first step


def _samples_uint8(net, solver, steps, num, batch, device, schedule="edm", afs=False):
    """Seeds 0..num-1 as uint8 images, a class-conditional network's with the labels every tool gives them
    (sampling.seed_labels: seed s draws class s mod label_dim), as fid calc --network samples them."""
    for i in range(0, num, batch):
        seeds = list(range(i, min(i + batch, num)))
        labels = seed_labels(seeds, getattr(net, "label_dim", 0), device)
        x = solvers.sample(net, seeds, solver=solver, steps=steps, schedule=schedule, class_labels=labels,
                           device=device, afs=afs)
        yield (x.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def nfe_digits_fd(args, net, device):
    """Digits FD vs NFE per solver for a snapshot trained on the embedded digits (fdm_fast.metrics.digits:
    the Frechet distance of a small digits classifier's features to the digits test split)."""
    from fdm_fast.metrics.evaluate import SampleEvaluator

    rows, scorer = [], None
    for solver in args.solvers:
        for steps in sorted({_steps_for(solver, n, args.afs) for n in args.nfe}):
            ev = SampleEvaluator("digits-fd", num=args.fid_num, steps=steps, sampler=solver, afs=args.afs,
                                 schedule=args.schedule, batch=args.batch[0], device=device, scorer=scorer)
            scorer = ev.scorer
            r = ev(net)
            print(f"  {solver} NFE {r['nfe']}: FD {r['fd']:.2f} ({r['seconds']:.1f} s)", flush=True)
            rows.append(dict(kind="fid", sampler=solver + _AFS[args.afs], schedule=args.schedule, nfe=r["nfe"],
                             fid=r["fd"], images=args.fid_num))
    return rows


def nfe_fid(args, net, device, extractor=None):
    """FID vs NFE per sampler for a trained snapshot against reference statistics (fdm_fast.fid)."""
    from fdm_fast.metrics import frechet_distance, load_ref, statistics
    from fdm_fast.metrics.inception import features, load_inception

    ref_mu, ref_sigma = load_ref(args.ref)
    extractor = extractor or load_inception(args.inception, device)
    rows = []
    for solver in args.solvers:
        for steps in sorted({_steps_for(solver, n, args.afs) for n in args.nfe}):
            feats = features(extractor, _samples_uint8(net, solver, steps, args.fid_num, args.batch[0], device,
                                                       args.schedule, args.afs), device)
            mu, sigma = statistics(feats)
            rows.append(dict(kind="fid", sampler=solver + _AFS[args.afs], schedule=args.schedule,
                             nfe=solvers.nfe(solver, steps, args.afs),
                             fid=frechet_distance(mu, sigma, ref_mu, ref_sigma), images=args.fid_num))
    return rows


def plot(rows, path, metric="FID"):
    """The speed panel (images/s vs NFE per variant, first batch size), the NFE study's panel (median
    per-sample error vs NFE per solver, dashed: the 90th percentile; log-log) and the network study's
    (``metric`` vs NFE per solver) as one PNG, drawn with Pillow (fdm_fast.plots), so every machine that
    runs the benchmark gets the picture. None without rows of any of these kinds."""
    panels = []
    sp = [r for r in rows if r["kind"] == "speed"]
    if sp:
        batch = sp[0]["batch"]
        series = []
        for v in sorted({r["variant"] for r in sp}):
            pts = sorted((r["nfe"], r["img_per_s"]) for r in sp if r["variant"] == v and r["batch"] == batch)
            series.append(dict(x=[n for n, _ in pts], y=[y for _, y in pts], label=v))
        panels.append(dict(series=series, title=f"sampler speed, batch {batch} (higher is better)", xlabel="NFE",
                           ylabel="images / s"))
    nf = [r for r in rows if r["kind"] == "nfe"]
    if nf:
        series = []
        for k, s in enumerate(solvers.SOLVERS):
            pts = sorted((r["nfe"], r["median_err"], r["p90_err"]) for r in nf if r["sampler"] == s)
            if pts:
                n, med, p90 = (list(c) for c in zip(*pts))
                series += [dict(x=n, y=med, label=s, color=k), dict(x=n, y=p90, color=k, dashed=True)]
        panels.append(dict(series=series, title="analytic mixture: median per-sample error (dashed: 90th percentile)",
                           xlabel="NFE", ylabel="RMS distance to a 500-step solution", logx=True, logy=True))
    fq = [r for r in rows if r["kind"] == "fid"]
    if fq:
        series = []
        for k, s in enumerate(solvers.SOLVERS):
            pts = sorted((r["nfe"], r["fid"]) for r in fq if r["sampler"] == s)
            if pts:
                series.append(dict(x=[n for n, _ in pts], y=[f for _, f in pts], label=s, color=k))
        panels.append(dict(series=series, title=f"{metric} of the network's samples vs NFE (lower is better)",
                           xlabel="NFE", ylabel=metric, logx=True, logy=True))
    if not panels:
        return None
    return subplots(path, panels, cols=len(panels))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device to time on (default cuda when there is one, else cpu)")
    ap.add_argument("--preset", default="auto", choices=["auto", "ffhq64", "digits"],
                    help="network of the speed part: 64x64 DDPM++ (ffhq64) or the 16x16 digits one (auto: ffhq64 on a "
                         "GPU, digits on a CPU)")
    ap.add_argument("--precond", default="fdm_edm", choices=list(PRECONDS), help="preconditioning (default fdm_edm)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 64)")
    ap.add_argument("--nfe", type=int, nargs="+", default=[13, 25, 35, 49, 79],
                    help="NFE values of the NFE study (analytic mixture, or --network) and, on a GPU, of the speed "
                         "part (default 13 25 35 49 79)")
    ap.add_argument("--speed-nfe", type=int, nargs="+", default=None,
                    help="NFE values for the speed part (default: 13 35 on CPU, all on GPU)")
    ap.add_argument("--nfe-samples", type=int, default=2000, help="samples per point of the NFE study")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3 CPU, 10 GPU)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write DIR/sampler_speed.json and DIR/sampler_speed.png (default: print only)")
    ap.add_argument("--network", type=Path, default=None,
                    help="a training snapshot: also measure FID vs NFE per sampler (needs --ref and the weights)")
    ap.add_argument("--ref", type=Path, default=None, help="reference statistics .npz for the FID study")
    ap.add_argument("--inception", default=None, help="Inception-v3 weights for the FID study (see fdm_fast.fid)")
    ap.add_argument("--fid-num", type=int, default=10000, help="images per FID point (default 10000)")
    ap.add_argument("--solvers", nargs="+", default=list(solvers.SOLVERS), choices=list(solvers.SOLVERS),
                    help="solvers of the NFE (and FID) study (default: all)")
    ap.add_argument("--schedule", default="edm", choices=list(solvers.SCHEDULES),
                    help="noise levels of the NFE (and FID) study (default edm)")
    ap.add_argument("--afs", action="store_true",
                    help="the NFE (and FID) study with the analytic first step (one network evaluation fewer at "
                         "each solver's first level; rows named solver+afs, at the same NFE as without)")
    ap.add_argument("--metric", default="fid", choices=["fid", "digits-fd"],
                    help="the --network study's metric: FID (needs --ref and --inception) or, for a snapshot "
                         "trained on --ds digits, the digits classifier's FD (no download)")
    ap.add_argument("--no-speed", action="store_true", help="skip the speed part")
    ap.add_argument("--no-compile", action="store_true",
                    help="the speed part without torch.compile: official, fused and, on CUDA, fused+graph (the "
                         "compiled variants' first call compiles for tens of seconds on a fresh machine)")
    ap.add_argument("--no-nfe-study", action="store_true", help="the speed part only (skip the analytic NFE study)")
    ap.add_argument("--time-budget", type=float, default=None, metavar="S",
                    help="end the speed part within about S seconds: variants not started by then are left out "
                         "and fewer repetitions are timed (at least one), instead of losing the run")
    add_results_arg(ap)
    args = ap.parse_args(argv)
    check_outputs(ap, args)
    args.deadline = deadline_after(args.time_budget)
    device = torch.device(args.device)
    args.batch = args.batch or [64]
    args.reps = args.reps or (10 if device.type == "cuda" else 3)
    ops.set_value_checks(False)
    speed_args = argparse.Namespace(**vars(args))
    speed_args.nfe = args.speed_nfe or (args.nfe if device.type == "cuda" else [13, 35])
    if args.network is not None:  # fail early, before minutes of timing
        from fdm_fast.metrics import MetricError, load_ref
        from fdm_fast.metrics.evaluate import check_metric
        from fdm_fast.metrics.inception import FIDError, inception_weights
        from fdm_fast.snapshots import SnapshotError, load_snapshot

        try:
            net = load_snapshot(str(args.network), device)  # loaded once, here, for the study at the end
            if args.metric == "digits-fd":  # a network of other images: said now, not after the speed part
                check_metric(args.metric, resolution=net.img_resolution, channels=net.img_channels)
            if args.metric == "fid":
                if args.ref is None or not args.ref.is_file():
                    raise FIDError(f"--ref {args.ref}: the FID study needs reference statistics "
                                   "(python -m fdm_fast.fid ref)")
                load_ref(args.ref)
                inception_weights(args.inception)
        except SnapshotError as e:
            ap.error(f"--network {e}")
        except (FIDError, MetricError) as e:
            ap.error(str(e))
    rows = ([] if args.no_speed else speed(speed_args, device)) + ([] if args.no_nfe_study else nfe_analytic(args))
    if args.network is not None:
        rows += nfe_fid(args, net, device) if args.metric == "fid" else nfe_digits_fd(args, net, device)
    machine = machine_name(device)
    print(machine)
    header = ["kind", "what", "batch", "NFE", "variant", "img/s", "ms/NFE", "first call s", "reps"]
    table = []
    for r in rows:
        if r["kind"] in ("speed", "overhead"):
            table.append([r["kind"], r["network"], str(r["batch"]), str(r["nfe"]), r["variant"],
                          f"{r['img_per_s']:.1f}", f"{r['ms_per_nfe']:.2f}", f"{r['first_call_s']:.1f}",
                          str(r["reps"])])
    if table:
        print_table(header, table)
    for kind in ("overhead", "speed"):
        by = {(r["batch"], r["nfe"], r["variant"]): r["seconds"] for r in rows if r["kind"] == kind}
        for (b, n, v), s in sorted(by.items()):
            if v != "official" and (b, n, "official") in by:
                print(f"{kind}: {v} vs official at batch {b}, NFE {n}: {by[(b, n, 'official')] / s:.2f}x")
    nheader = ["solver", "NFE", "median err", "p90 err", "switched component", "RMS (all)", "mean error",
               "cov rel. error"]
    ntable = [[r["sampler"], str(r["nfe"]), f"{r['median_err']:.2e}", f"{r['p90_err']:.2e}",
               f"{r['switched']}/{args.nfe_samples}", f"{r['rms_to_reference']:.2e}", f"{r['mean_err']:.3f}",
               f"{r['cov_err']:.3f}"] for r in rows if r["kind"] == "nfe"]
    if ntable:
        print("\nanalytic Gaussian mixture (6 components, 3x4x4):")
        print_table(nheader, ntable)
    ftable = [[r["sampler"], str(r["nfe"]), f"{r['fid']:.2f}", str(r["images"])] for r in rows if r["kind"] == "fid"]
    mname = "FID" if args.metric == "fid" else "digits FD"
    if ftable:
        print(f"\n{mname} vs NFE ({args.network}, schedule {args.schedule}):")
        print_table(["solver", "NFE", mname, "images"], ftable)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "sampler_speed.json", dict(machine=machine, rows=rows))
        print(f"json: {args.out / 'sampler_speed.json'}")
        png = plot(rows, str(args.out / "sampler_speed.png"), metric=mname)
        if png:
            print(f"plot: {png}")
    if args.results:
        cmd = f"`python benchmarks/sampler_speed.py {' '.join(argv or sys.argv[1:])}`"
        if table:
            append_results("sampler_speed: speed", header, table,
                           [f"Machine: {machine}", f"Command: {cmd}", "official = EDM's float64 op-by-op sampler; "
                            "fused = fdm_fast.sampling on the fused step ops"], path=args.results)
        if ntable:
            append_results("sampler_speed: NFE on the analytic mixture", nheader, ntable,
                           [f"Machine: {machine}", f"Command: {cmd}",
                            f"precond {args.precond}; schedule {args.schedule}; {args.nfe_samples} samples; the "
                            "reference solution is Heun with 500 steps from the same noise; err = per-sample RMS "
                            "distance to it; switched = samples whose most likely mixture component differs from the "
                            "reference's"],
                           path=args.results)
        if ftable:
            append_results(f"sampler_speed: {mname} vs NFE", ["solver", "NFE", mname, "images"], ftable,
                           [f"Machine: {machine}", f"Command: {cmd}",
                            f"network {args.network}, schedule {args.schedule}"
                            + (f", reference {args.ref}" if args.metric == "fid" else "")], path=args.results)


if __name__ == "__main__":
    main()
