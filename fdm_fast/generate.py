"""Generate images from a training snapshot: ``python -m fdm_fast.generate --network SNAP --seeds 0-63``.

Each image depends on its seed only (per-image noise under the noise contract), never on the batch
it was drawn in, so any split of the seeds, over batches or over ranks (``torchrun
--nproc_per_node=N -m fdm_fast.generate ...``), gives the same images. Output: PNGs in ``--outdir``
(1000 per subfolder, named by seed; each written under a temporary name, then renamed) and/or one
``--grid`` PNG. ``--skip-existing`` draws only the seeds whose PNG is missing: the same command
finishes a run that was cut short.

Solvers (``--solver``, ``--steps``, ``--schedule``; fdm_fast.solvers): heun (EDM's, NFE 2N - 1), euler,
dpm++2m, dpm++3m, dpm++2m-sde, ipndm, unipc, dpm3s (the official FDM code's DPM-Solver; use it with
--schedule logsnr) (NFE N; ``--afs`` spends one fewer). Guidance: ``--guidance W`` with a class-conditional network is
classifier-free guidance (train it with ``--cond --cond-drop P``); with ``--guide-network SNAP`` it is
autoguidance by that weaker network. Few steps, as measured on the digits model (README: which solver
at which NFE): dpm++2m or ipndm at NFE 6-10 (dpm++2m with --afs), dpm++3m at NFE 5; heun needs about
NFE 19.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Optional

import torch

from . import ops
from . import solvers
from .sampling import GraphedSampler, edm_sampler, seed_labels
from .schedules import time_steps
from .distributed import eprint, init_distributed, shutdown_distributed
from .images import SETTINGS_FILE, read_image_settings, save_grid, write_image_settings
from .snapshots import (SnapshotError, cannot_write, cannot_write_in, load_snapshot, missing_folders,
                        network_file, remove_empty_folders, sha256_of)


def parse_seeds(s: str) -> list:
    """'0-49999', '1,5,7-9' -> list of ints."""
    out = []
    for part in s.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ValueError(f"--seeds: range {part} is empty")
            out.extend(range(a, b + 1))
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ValueError(f"--seeds: expected numbers and ranges like 0-99,105, got {part!r}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fdm_fast.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", required=True,
                    help="a network-snapshot-*.pt of fdm_fast.train, an official EDM/FDM network-snapshot-*.pkl "
                         "(read without running its code) or a .safetensors of fdm_fast.convert; a run folder "
                         "stands for its newest snapshot")
    ap.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-49999 or 1,5,7-9 (default 0-63)")
    ap.add_argument("--steps", type=int, default=18, help="solver steps N (heun: NFE = 2N - 1, others N; default 18)")
    ap.add_argument("--solver", default=None, choices=list(solvers.SOLVERS),
                    help="ODE/SDE solver (default heun; see above)")
    ap.add_argument("--sampler", default=None, choices=["heun", "euler", "dpm2m", "ipndm"],
                    help="the old name of --solver (dpm2m = dpm++2m)")
    ap.add_argument("--schedule", default="edm", choices=list(solvers.SCHEDULES),
                    help="noise levels: EDM's rho schedule, uniform log-SNR, or uniform diffusion time (default edm)")
    ap.add_argument("--order", type=int, default=None,
                    help="multistep order (dpm++3m: 2-3, ipndm: 1-4, unipc: 1-3; default the highest)")
    ap.add_argument("--afs", action="store_true",
                    help="analytic first step: the first network evaluation replaced by the posterior mean of "
                         "Gaussian data, one NFE fewer (any solver; README: where it helps)")
    ap.add_argument("--guidance", type=float, default=1.0,
                    help="guidance weight w: D = D_guide + w (D - D_guide); 1 = unguided (default). Without "
                         "--guide-network: classifier-free guidance (a class-conditional network)")
    ap.add_argument("--guide-network", default=None, metavar="SNAP",
                    help="autoguidance: a weaker snapshot of the same task (e.g. an earlier one) as the guide; "
                         "any format --network takes")
    ap.add_argument("--S-churn", dest="S_churn", type=float, default=0.0,
                    help="stochasticity (EDM's S_churn; default 0)")
    ap.add_argument("--S-min", dest="S_min", type=float, default=0.0, help="churn only at sigma >= S_min (default 0)")
    ap.add_argument("--S-max", dest="S_max", type=float, default=float("inf"),
                    help="churn only at sigma <= S_max (default inf)")
    ap.add_argument("--S-noise", dest="S_noise", type=float, default=1.0, help="scale of the churn noise (default 1)")
    ap.add_argument("--sigma-min", type=float, default=0.002,
                    help="lowest noise level of the schedule (default 0.002, raised to the network's own minimum)")
    ap.add_argument("--sigma-max", type=float, default=80.0,
                    help="highest noise level, where sampling starts (default 80, lowered to the network's own "
                         "maximum)")
    ap.add_argument("--rho", type=float, default=7.0, help="exponent of EDM's rho schedule (--schedule edm; default 7)")
    ap.add_argument("--batch", type=int, default=64, help="images per batch (default 64)")
    ap.add_argument("--class", dest="class_idx", type=int, default=None,
                    help="class of every image (class-conditional networks; default: seed s draws class s mod the "
                         "number of classes)")
    ap.add_argument("--outdir", default=None,
                    help="write one PNG per seed here (1000 per subfolder), and generate.json: the network's SHA-256 "
                         "and the sampling options, which a later run into the same folder must share")
    ap.add_argument("--skip-existing", action="store_true",
                    help="with --outdir: do not generate seeds whose PNG is already there, so a run cut short "
                         "continues where it stopped (each image depends on its seed only; PNGs are written "
                         "under a temporary name and renamed, so one that exists is complete)")
    ap.add_argument("--grid", default=None,
                    help="write all images as one grid PNG here (its folder is made when missing)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="network precision (default fp32)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the network (default: on with CUDA)")
    ap.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                    help="replay the whole sampler loop as one CUDA graph per full batch (default: on with CUDA)")
    args = ap.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        eprint(f"error: {e}")
        return 2
    if not args.outdir and not args.grid:
        eprint("error: give --outdir DIR and/or --grid FILE.png")
        return 2
    if args.skip_existing and (not args.outdir or args.grid):
        eprint("error: --skip-existing: expected --outdir without --grid (a grid needs every image generated), got "
               + (f"--grid {args.grid}" if args.grid else "no --outdir"))
        return 2
    old_name = {"dpm2m": "dpm++2m"}.get(args.sampler, args.sampler)  # --sampler's value as a solver name
    if args.sampler and args.solver and old_name != args.solver:
        eprint(f"error: --sampler {args.sampler} and --solver {args.solver} disagree (--sampler is the old name)")
        return 2
    args.solver = args.solver or old_name or "heun"
    fused_edm = args.solver in ("heun", "euler") and args.guidance == 1 and not args.guide_network \
        and args.schedule == "edm" and not args.afs  # EDM's own fused step ops (and churn)
    if args.S_churn > 0 and not fused_edm:
        eprint("error: --S-churn: stochastic churn is EDM's Heun/Euler option, unguided, on the edm schedule, "
               f"without --afs; got --solver {args.solver} --schedule {args.schedule} --guidance {args.guidance}"
               + (" with --guide-network" if args.guide_network else "") + (" with --afs" if args.afs else "")
               + " (dpm++2m-sde is the stochastic solver)")
        return 2
    for flag, attr in (("--network", "network"), ("--guide-network", "guide_network")):
        given = getattr(args, attr)
        if not given:
            continue
        try:  # a run folder stands for its newest snapshot, named here and recorded as that file
            setattr(args, attr, network_file(given))
        except SnapshotError as e:
            eprint(f"error: {flag} {e}")
            return 2
        if not os.path.isfile(getattr(args, attr)):
            eprint(f"error: {flag} {given}: no such file")
            return 2
        if getattr(args, attr) != given and os.environ.get("RANK", "0") == "0":
            print(f"{flag} {given}: its newest snapshot, {getattr(args, attr)}", flush=True)
    for flag, v in (("--batch", args.batch), ("--steps", args.steps)):
        if v < 1:
            eprint(f"error: {flag}: expected a positive integer, got {v}")
            return 2
    bad = _bad_number(args)
    if bad:
        eprint(f"error: {bad}")
        return 2
    # the folders made now (last: a refused command leaves no folder behind); removed again, if still empty,
    # when a refusal that needs the network comes later
    made = [f for out in (args.outdir, os.path.dirname(os.path.abspath(args.grid)) if args.grid else None) if out
            for f in missing_folders(out)]
    if args.grid:
        why = (f"is a folder; expected the PNG file to write (e.g. {args.grid}/grid.png)" if os.path.isdir(args.grid)
               else cannot_write(args.grid))
        if why is not None:
            eprint(f"error: --grid {args.grid}: {why}")
            remove_empty_folders(made)
            return 2
    if args.outdir:
        why = cannot_write_in(args.outdir)
        if why is not None:
            eprint(f"error: --outdir {args.outdir}: {why}")
            remove_empty_folders(made)  # --grid's
            return 2
    ours = not torch.distributed.is_initialized()  # a caller's own process group is left to the caller
    init_distributed()
    rc = 1
    try:
        rc = _generate(args, seeds, fused_edm)
        return rc
    except KeyboardInterrupt:  # Ctrl-C: a line that says what is kept, not a traceback
        eprint("\ninterrupted: " + (f"every PNG in {args.outdir} is complete; the same command with --skip-existing "
                                     "finishes it" if args.outdir else "no grid was written"))
        rc = 130
        return rc
    finally:  # on every rank, errors included (a process group left to the interpreter's exit can hang there)
        if ours:
            shutdown_distributed()
        if rc != 0:
            remove_empty_folders(made)


def _bad_number(args) -> Optional[str]:
    """What is wrong with the first sampling number no sampler takes (``--flag: expected ..., got ...``), or
    None. Checked before any folder or network; the range left after clipping to the network's own is
    checked once the network is loaded."""
    for flag, v in (("--S-churn", args.S_churn), ("--S-noise", args.S_noise), ("--sigma-min", args.sigma_min)):
        if not (math.isfinite(v) and v >= 0):
            return f"{flag}: expected a finite number >= 0, got {v}"
    if not (math.isfinite(args.rho) and args.rho > 0):
        return f"--rho: expected a positive finite number, got {args.rho}"
    if not args.sigma_max > 0:  # inf is allowed: it is lowered to the network's maximum
        return f"--sigma-max: expected a positive number, got {args.sigma_max}"
    if args.sigma_min > args.sigma_max:
        return f"--sigma-min {args.sigma_min:g} is above --sigma-max {args.sigma_max:g}"
    for flag, v in (("--S-min", args.S_min), ("--S-max", args.S_max)):
        if math.isnan(v):
            return f"{flag}: expected a number, got nan"
    if not math.isfinite(args.guidance):
        return f"--guidance: expected a finite number (1 = unguided), got {args.guidance}"
    return None


def _generate(args, seeds: list, fused_edm: bool) -> int:
    """main's work once the arguments are checked and the process group (if any) is up."""
    rank, world, device = init_distributed()
    # value checks read tensors: a sync per op call on a GPU, so they stay on only for the CPU
    ops.set_value_checks(device.type == "cpu")
    torch.backends.cudnn.benchmark = True
    if args.cuda_graph and device.type != "cuda":
        eprint("error: --cuda-graph needs a CUDA device")
        return 2
    try:
        net = load_snapshot(args.network, device)
    except SnapshotError as e:
        eprint(f"error: --network {e}")
        return 2
    p = net.precond
    try:
        time_steps(args.steps, args.schedule, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
                   precond=p)
    except ValueError:
        eprint(f"error: --sigma-min {args.sigma_min:g} / --sigma-max {args.sigma_max:g}: nothing is left after "
               f"clipping to the network's noise range [{p.sigma_min:g}, {p.sigma_max:g}] ({p.name})")
        return 2
    guide = None
    if args.guide_network:
        try:
            guide = load_snapshot(args.guide_network, device)
        except SnapshotError as e:
            eprint(f"error: --guide-network {e}")
            return 2
    if args.guidance != 1 and guide is None and not net.label_dim:
        eprint(f"error: --guidance {args.guidance}: classifier-free guidance needs a class-conditional network "
               f"({args.network} has no labels); give --guide-network SNAP for autoguidance")
        return 2
    if args.class_idx is not None and not net.label_dim:
        eprint("error: --class: this network is unconditional")
        return 2
    if args.class_idx is not None and not 0 <= args.class_idx < net.label_dim:
        eprint(f"error: --class: expected 0..{net.label_dim - 1}, got {args.class_idx}")
        return 2
    settings = image_settings(args) if args.outdir else None
    if settings:  # one folder, one set of settings: a resumed or repeated run may not mix in others
        why = _settings_refused(args.outdir, settings)
        if why:
            eprint(f"error: --outdir {args.outdir}: {why}")
            return 2
    mine = seeds[rank::world]
    skipped = 0
    if args.skip_existing:  # each rank checks only its own seeds: no race with another rank's writes
        todo = seeds_to_do(args.outdir, mine)
        skipped, mine = len(mine) - len(todo), todo
        if world > 1:
            t = torch.tensor([skipped], device=device)
            torch.distributed.all_reduce(t)
            skipped = int(t.item())
    batches = [mine[i:i + args.batch] for i in range(0, len(mine), args.batch)]
    from tqdm import tqdm

    kw = dict(num_steps=args.steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
              S_churn=args.S_churn, S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise,
              heun=args.solver == "heun", device=device,
              net_dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
    if args.compile if args.compile is not None else device.type == "cuda":
        net.model = torch.compile(net.model)
        if guide is not None:
            guide.model = torch.compile(guide.model)
    use_graph = args.cuda_graph if args.cuda_graph is not None else device.type == "cuda"
    if fused_edm:
        sampler = edm_sampler
    else:
        sampler = solvers.sample
        kw = dict(solver=args.solver, steps=args.steps, schedule=args.schedule, order=args.order, afs=args.afs,
                  sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho, guidance=args.guidance,
                  guide=guide, device=device, net_dtype=kw["net_dtype"])
        try:  # bad combinations (an order the solver does not take) fail here, before any image
            solvers.check_options(args.solver, args.steps, args.schedule, args.order, args.afs)
        except ValueError as e:
            eprint(f"error: {e}")
            return 2
    if settings and rank == 0:  # recorded once the run is past its checks (a refused one leaves no file)
        write_image_settings(args.outdir, settings)
    graphed = None
    results = []
    for batch in tqdm(batches, unit="batch", disable=rank != 0, desc="generate"):
        labels = seed_labels(batch, net.label_dim, device, args.class_idx)  # None for an unconditional net
        if use_graph and len(batch) == args.batch:
            graphed = graphed or GraphedSampler(net, args.batch, sampler=sampler, **kw)
            images = graphed(batch, labels)
        else:
            images = sampler(net, batch, class_labels=labels, **kw)
        if args.outdir:
            arr = (images.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for s, a in zip(batch, arr):
                save_png(a, png_path(args.outdir, s))
        if args.grid:
            results.append(images.cpu())
    if args.grid:
        images = torch.cat(results) if results else torch.zeros(0)
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, (mine, images))
            order = {s: img for ss, im in gathered for s, img in zip(ss, im)}
            images = torch.stack([order[s] for s in seeds])
        if rank == 0:
            save_grid(images, args.grid)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        n = solvers.nfe(args.solver, args.steps, args.afs)
        guided = "" if args.guidance == 1 and guide is None else \
            f", guidance {args.guidance} ({'autoguidance' if guide is not None else 'classifier-free'}: 2 network " \
            f"evaluations per NFE)"
        print(f"generated {len(seeds) - skipped} images ({args.solver}, {args.schedule} schedule, {args.steps} steps, "
              f"{'analytic first step, ' if args.afs else ''}NFE {n}{guided})"
              + (f" -> {args.outdir}" if args.outdir else "") + (f" -> {args.grid}" if args.grid else "")
              + (f"; skipped {skipped} seeds whose PNG was there" if args.skip_existing else ""))
    return 0


def image_settings(args) -> dict:
    """What decides an image besides its seed (not the batch size: images are batch-invariant, nor compile
    or backend, which change rounding only): the networks' SHA-256 and every sampling option."""
    return dict(network_sha256=sha256_of(args.network),
                guide_network_sha256=sha256_of(args.guide_network) if args.guide_network else None,
                solver=args.solver, schedule=args.schedule, steps=args.steps, order=args.order, afs=args.afs,
                guidance=args.guidance, class_idx=args.class_idx, precision=args.precision,
                sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho, S_churn=args.S_churn,
                S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise)


# settings a generate.json written before they existed does not hold, and the value that meant
SETTINGS_ADDED_LATER = {"afs": False}


def _settings_refused(outdir: str, settings: dict) -> Optional[str]:
    """Why ``outdir`` may not take images of ``settings`` (its generate.json records others), or None (no
    record: a new folder, or one an older version wrote)."""
    path = os.path.join(outdir, SETTINGS_FILE)
    try:
        old = read_image_settings(outdir)
        if old is None:
            return None
        diff = [k for k in settings if old.get(k, SETTINGS_ADDED_LATER.get(k)) != settings[k]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"cannot read {path} ({type(e).__name__}: {e}); remove it to go on"
    if not diff:
        return None
    short = lambda k, v: f"{v[:12]}..." if k.endswith("sha256") and isinstance(v, str) else repr(v)  # noqa: E731
    return ("holds images made with other settings (" + "; ".join(f"{k}: {short(k, old.get(k))} there, "
                                                                 f"{short(k, settings[k])} now" for k in diff)
            + f"; from {path}): use another --outdir or the settings that made them, or remove that file to "
            "write over them")


def png_path(outdir: str, seed: int) -> str:
    """Where seed's image goes: 1000 per subfolder, as EDM's generate.py names them."""
    return os.path.join(outdir, f"{seed - seed % 1000:06d}", f"{seed:06d}.png")


def seeds_to_do(outdir: str, seeds: list) -> list:
    """The seeds without a PNG in outdir; temporary files a killed run left for these seeds are removed
    (only these: another rank may be writing its own)."""
    listed, todo = {}, []  # folder -> (its PNG names, {PNG name: its temporary files})
    for s in seeds:
        d = os.path.dirname(png_path(outdir, s))
        if d not in listed:
            names, tmps = set(), {}
            for n in (os.listdir(d) if os.path.isdir(d) else []):
                base, sep, _ = n.partition(".tmp")
                if sep:
                    tmps.setdefault(base, []).append(n)
                else:
                    names.add(n)
            listed[d] = names, tmps
        names, tmps = listed[d]
        name = f"{s:06d}.png"
        for stale in tmps.pop(name, []):
            os.remove(os.path.join(d, stale))
        if name not in names:
            todo.append(s)
    return todo


def save_png(a, path: str) -> None:
    """One image (HWC uint8 array) as a PNG, written under a temporary name and renamed: a run killed
    mid-write leaves no truncated PNG under the final name (the temporary name is no image to FID tools)."""
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(tmp, format="PNG")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())

