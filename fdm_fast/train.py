"""Train VP / VE / EDM models and their FDM variants: ``python -m fdm_fast.train --ds digits``.

The loop follows EDM's training_loop (Adam with lr ramp-up, non-finite gradients zeroed, EMA with a
half-life and ramp-up) on fdm_fast's fused ops: perturb -> SongUNet -> fused denoising loss, the FDM
loss-weight warm-up driven by the optimizer step. Checkpoints (every ``--ckpt`` kimg, and at least
every ``--ckpt-minutes`` of training) are written atomically (temporary file, then rename), the last
K kept, and ``--resume auto`` continues the newest one exactly: model, EMA, optimizer, step, data
order, RNG and warm-up. Network snapshots (``network-snapshot-*.pt``) hold the EMA weights and the
config, load with ``torch.load(weights_only=True)``, and come with a grid of samples (EDM Heun on the
fused step ops); ``training.png`` plots the loss and img/s of every tick (``stats.jsonl``). Ctrl-C
(SIGINT) or SIGTERM stops a run after the current step with a training state (exit status 128 + the
signal); ``--resume auto`` continues it.

Several GPUs or nodes: ``torchrun --nproc_per_node=N -m fdm_fast.train ...`` (DDP; NCCL on GPUs,
gloo on CPUs); each rank draws its own data shard and noise, rank 0 logs and writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from typing import Optional

import numpy as np
import torch

from . import ops
from .data import DatasetError, open_dataset
from .data.augment import AUGMENT_DIM, NUM_UNIFORMS, AugmentPipe, to_device
from .data.order import GlobalOrder
from .loss import fdm_clamp, noise_rng, sample_uniforms, training_loss
from .distributed import eprint, init_distributed, shutdown_distributed
from .images import save_grid
from .metrics import MetricError
from .metrics.evaluate import METRICS, SampleEvaluator, check_metric
from .plots import line_plot, read_metric_records, read_tick_records, subplots
from .nn import build_denoiser, count_parameters, network_settings
from .sampling import edm_sampler, seed_labels
from .schedules import PRECONDS
from .snapshots import (SnapshotError, atomic_save, cannot_write_in, checkpoints, load_snapshot,  # noqa: F401
                        load_state, missing_folders, network_file, newest_valid_checkpoint, normalise_config, remove,
                        remove_empty_folders, remove_stale_temp_files, run_lock, snapshot_name, WriteError)

# Per-dataset defaults: the official EDM/FDM recipes (CIFAR-10 32x32, FFHQ/AFHQv2 64x64), and a small
# network for the embedded digits that trains to recognisable samples in minutes on a 2-core CPU.
RECIPES = {
    "cifar10": dict(batch=512, lr=1e-3, dropout=0.13, augment=0.12, ema=0.5, lr_rampup=10.0, duration=200.0,
                    channel_mult=(2, 2, 2), warmup_edm=200, xflip=False),
    "ffhq": dict(batch=256, lr=2e-4, dropout=0.05, augment=0.15, ema=0.5, lr_rampup=10.0, duration=200.0,
                 channel_mult=(1, 2, 2, 2), warmup_edm=800, xflip=True),
    "afhqv2": dict(batch=256, lr=2e-4, dropout=0.25, augment=0.15, ema=0.5, lr_rampup=10.0, duration=200.0,
                   channel_mult=(1, 2, 2, 2), warmup_edm=400, xflip=True),
    "digits": dict(batch=64, lr=2e-3, dropout=0.0, augment=0.0, ema=0.01, lr_rampup=0.001, duration=0.06,
                   channel_mult=(1, 2, 2), warmup_edm=400, xflip=False,
                   network=dict(model_channels=32, num_blocks=2, attn_resolutions=(8,))),
    "custom": dict(batch=512, lr=1e-3, dropout=0.13, augment=0.0, ema=0.5, lr_rampup=10.0, duration=200.0,
                   channel_mult=None, warmup_edm=400, xflip=False),
}


@dataclasses.dataclass
class Options:
    ds: str
    data: Optional[str]
    outdir: str
    precond: str
    arch: str
    cond: bool
    kimg: float
    batch: int
    batch_gpu: Optional[int]
    lr: float
    lr_rampup: float
    ema: float
    ema_rampup: float
    dropout: float
    augment: float
    xflip: bool
    warmup_ite: Optional[int]
    fdm_multiplier: Optional[float]
    compile: bool
    precision: str
    tf32: bool
    seed: int
    resume: Optional[str]
    tick: float
    snap: float
    ckpt: float
    keep: int
    grid: int
    grid_steps: int
    resolution: Optional[int]
    backend: Optional[str]
    channel_mult: Optional[tuple]
    network: dict
    exact_reduce: bool = False
    data_on_device: str = "auto"
    metric: Optional[str] = None
    metric_every: Optional[float] = None
    metric_num: int = 500
    metric_steps: int = 9
    inception: Optional[str] = None
    ref: Optional[str] = None
    cond_drop: float = 0.0
    ckpt_minutes: float = 30.0  # 0: training checkpoints by --ckpt kimg only
    transfer: Optional[str] = None


# ------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m fdm_fast.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__, epilog="""examples:
  python -m fdm_fast.train --ds digits                               # embedded data, minutes on a CPU
  python -m fdm_fast.train --ds cifar10 --precond fdm_vp --dry-run   # print the resolved options
  torchrun --nproc_per_node=8 -m fdm_fast.train --ds ffhq --precond fdm_edm --batch 256
  python -m fdm_fast.train --ds cifar10 --precond fdm_edm --transfer edm-cifar10-32x32-uncond-vp.pkl  # fine-tune""")
    a = ap.add_argument
    a("--ds", default="digits", help="cifar10, ffhq, afhqv2, digits (embedded, no download), synthetic (random "
                                     "images of --resolution, for benchmarks), or a dataset path (default: digits)")
    a("--data", default=None, help="dataset zip or folder (EDM format); default datasets/<name>.zip for the named sets")
    a("--outdir", default=None, help="run folder for options, stats, checkpoints, snapshots "
                                     "(default: runs/<ds>-<precond>-<arch>)")
    a("--precond", default="fdm_edm", choices=PRECONDS, help="preconditioning (default: fdm_edm)")
    a("--arch", default="ddpmpp", choices=["ddpmpp", "ncsnpp", "adm"],
      help="network: SongUNet as DDPM++ or NCSN++, or ADM (EDM's DhariwalUNet) (default: ddpmpp)")
    a("--cbase", type=int, default=None, help="base channel count (model_channels; recipe/architecture default)")
    a("--cres", default=None, help="channel multipliers per resolution, e.g. 1,2,2,2 (recipe default)")
    a("--cond", action="store_true", help="class-conditional (needs labels: dataset.json, or digits)")
    a("--cond-drop", type=float, default=0.0, metavar="P",
      help="with --cond: drop each sample's label (all zeros) with probability P, so the network also learns "
           "the unconditional denoiser that classifier-free guidance needs (generate --guidance W); default 0")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--kimg", type=float, default=None, help="training length in thousands of images")
    g.add_argument("--duration", type=float, default=None, help="training length in millions of images "
                                                                 "(recipe default: 200 for cifar10/ffhq/afhqv2)")
    a("--batch", type=int, default=None, help="total batch size over all GPUs (recipe default: 512 cifar10, "
                                              "256 ffhq/afhqv2, 64 digits)")
    a("--batch-gpu", type=int, default=None, help="per-GPU batch per round; smaller than batch/GPUs means "
                                                  "gradient accumulation (default: no accumulation)")
    a("--lr", type=float, default=None, help="Adam learning rate (recipe default: 1e-3 cifar10, 2e-4 "
                                             "ffhq/afhqv2, 2e-3 digits)")
    a("--lr-rampup", type=float, default=None, help="learning-rate ramp-up in Mimg (recipe default: 10; digits 0.001)")
    a("--ema", type=float, default=None, help="EMA half-life in Mimg (recipe default: 0.5; digits 0.01)")
    a("--ema-rampup", type=float, default=0.05,
      help="EMA ramp-up ratio: half-life <= ratio x images seen (default 0.05)")
    a("--dropout", type=float, default=None, help="dropout probability (recipe default: 0.13 cifar10, 0.05 ffhq, "
                                                  "0.25 afhqv2, 0 digits)")
    a("--augment", type=float, default=None, help="non-leaky augmentation probability p, EDM's pipeline "
                                                  "(recipe default: 0.12 cifar10, 0.15 ffhq/afhqv2, 0 digits)")
    a("--xflip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips of the data")
    a("--warmup-ite", type=int, default=None, help="FDM loss-weight warm-up length in optimizer steps "
                                                   "(default: 200 for fdm_edm on cifar10, 800 on ffhq, else 400)")
    a("--fdm-multiplier", type=float, default=None, help="FDM's m in c_in = exp(-mB)(1+mB) (default 2, fdm_ve 1)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the network (default: on with CUDA, off on the CPU)")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="network precision: bf16 autocast or fp32; auto (default) is bf16 where the device computes it "
           "(CUDA GPUs of compute capability 8.0 on; CPUs with AVX-512, where oneDNN has bf16 kernels) and fp32 "
           "elsewhere (an AVX2 CPU took 10x as long per digits step in bf16); fp16 is refused for FDM (its "
           "input underflows)")
    a("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on Ampere+ GPUs (default on)")
    a("--seed", type=int, default=0, help="random seed (default 0)")
    a("--resume", default=None, help="'auto' (newest checkpoint in --outdir, if any) or a checkpoint path")
    a("--transfer", default=None, metavar="SNAP",
      help="start from the weights of a network snapshot (any format generate --network takes: an fdm_fast "
           ".pt, an official EDM/FDM .pkl, a converted .safetensors, a run folder's newest) of the same "
           "architecture, as EDM's --transfer: network and EMA take its EMA weights, the optimizer and the step "
           "start anew; the preconditioning may differ (e.g. FDM-EDM from an EDM snapshot). A checkpoint to "
           "resume wins")
    a("--tick", type=float, default=None, help="kimg between progress/stat lines (default: about 1%% of the run)")
    a("--snap", type=float, default=None,
      help="kimg between network snapshots + sample grids (default: 10%% of the run)")
    a("--ckpt", type=float, default=None, help="kimg between training checkpoints (default: = --snap)")
    a("--ckpt-minutes", type=float, default=30.0, metavar="M",
      help="also write a training checkpoint when M minutes have passed since the last one, so a crash or "
           "a killed job loses at most M minutes of training whatever --ckpt is (default 30; 0: off)")
    a("--keep", type=int, default=3, help="training checkpoints to keep (default 3)")
    a("--grid", type=int, default=64, help="images in each snapshot's sample grid (default 64)")
    a("--grid-steps", type=int, default=18, help="Heun steps for the sample grid (default 18)")
    a("--resolution", type=int, default=None, help="digits: upsampled resolution (default 16); else a check")
    a("--backend", default=None, help="fused-op backend (default: the fastest available)")
    a("--exact-reduce", action="store_true",
      help="with several ranks: add the ranks' gradients in rank order (all-gather; world x the traffic), so "
           "N ranks with one round each train bitwise what one process with N accumulation rounds does "
           "(default: an all-reduce sum, bitwise the same for 2 ranks, float-rounding close otherwise)")
    a("--data-on-device", default="auto", choices=["auto", "on", "off"],
      help="keep the uint8 dataset in accelerator memory and index batches there (auto: when it takes at most "
           "a quarter of the free memory; CIFAR-10 is 150 MB, FFHQ-64 860 MB); otherwise batches are gathered "
           "into pinned host memory and copied asynchronously (default: auto)")
    a("--metric", default=None, choices=list(METRICS),
      help="evaluate the EMA network during training: digits-fd (digits only: Frechet distance on a digits "
           "classifier's features, with KID, precision/recall, class coverage) or fid (needs --inception and "
           "--ref); figures go to stats.jsonl, a plot to metrics.png (default: none)")
    a("--metric-every", type=float, default=None, help="kimg between evaluations, on multiples of it "
                                                       "(default: = --snap); the run's end is always evaluated")
    a("--metric-num", type=int, default=500, help="samples per evaluation, seeds 0..N-1 (default 500)")
    a("--metric-steps", type=int, default=9, help="Heun steps per evaluation sample (NFE 2 x steps - 1; default 9)")
    a("--inception", default=None, help="--metric fid: path to weights-inception-2015-12-05-6726825d.pth")
    a("--ref", default=None, help="--metric fid: reference statistics .npz (python -m fdm_fast.fid ref)")
    a("--dry-run", action="store_true", help="print the resolved options and exit")
    return ap.parse_args(argv)


def resolve(args: argparse.Namespace) -> Options:
    """The options of the run: command line over the dataset's recipe."""
    name = args.ds if args.ds in RECIPES else "custom"
    r = RECIPES[name]
    if args.kimg is not None:
        kimg = args.kimg
    else:
        kimg = (args.duration if args.duration is not None else r["duration"]) * 1000
    if not kimg > 0:
        flag, v = ("--kimg", args.kimg) if args.kimg is not None else ("--duration", args.duration)
        raise SystemExit(f"error: {flag}: expected a positive training length, got {v}")
    batch = args.batch if args.batch is not None else r["batch"]
    warm = args.warmup_ite
    if warm is None and args.precond.startswith("fdm_"):
        warm = r["warmup_edm"] if args.precond == "fdm_edm" else 400
    for flag, v in (("--batch", batch), ("--batch-gpu", args.batch_gpu)):
        if v is not None and v <= 0:
            raise SystemExit(f"error: {flag}: expected a positive integer, got {v}")
    if args.precision == "fp16" and args.precond.startswith("fdm_"):
        raise SystemExit("error: --precision fp16 with an FDM preconditioning: FDM's network input is "
                         "c_in (y + sigma n) with c_in about 4e-8 at sigma 80 (m = 2), below fp16's range; "
                         "use --precision bf16 (same exponent range as fp32) or fp32")
    if args.augment is not None and not 0 <= args.augment <= 1:
        raise SystemExit(f"error: --augment: expected a probability in [0, 1], got {args.augment}")
    if not 0 <= args.cond_drop < 1:
        raise SystemExit(f"error: --cond-drop: expected a probability in [0, 1), got {args.cond_drop}")
    if args.cond_drop and not args.cond:
        raise SystemExit("error: --cond-drop: label dropout needs a class-conditional network (--cond)")
    if args.transfer is not None:
        try:  # a run folder stands for its newest snapshot (options.json records the file)
            transfer = network_file(args.transfer)
        except SnapshotError as e:
            raise SystemExit(f"error: --transfer {e}") from None
        if not os.path.isfile(transfer):
            raise SystemExit(f"error: --transfer {args.transfer}: no such file")
        args.transfer = transfer
    if args.fdm_multiplier is not None and not args.precond.startswith("fdm_"):
        raise SystemExit(f"error: --fdm-multiplier applies to the fdm_* preconditionings, got --precond {args.precond}")
    for flag, v, ok, what in (
            ("--lr", args.lr, lambda v: v > 0, "a positive learning rate"),
            ("--lr-rampup", args.lr_rampup, lambda v: v >= 0, "a length >= 0 in Mimg"),
            ("--ema", args.ema, lambda v: v >= 0, "a half-life >= 0 in Mimg"),
            ("--ema-rampup", args.ema_rampup, lambda v: v >= 0, "a ratio >= 0"),
            ("--dropout", args.dropout, lambda v: 0 <= v < 1, "a probability in [0, 1)"),
            ("--warmup-ite", args.warmup_ite, lambda v: v >= 0, "a number of steps >= 0"),
            ("--fdm-multiplier", args.fdm_multiplier, lambda v: v > 0, "a positive number"),
            ("--seed", args.seed, lambda v: v >= 0, "an integer >= 0"),
            ("--tick", args.tick, lambda v: v > 0, "a positive number of kimg"),
            ("--snap", args.snap, lambda v: v > 0, "a positive number of kimg"),
            ("--ckpt", args.ckpt, lambda v: v > 0, "a positive number of kimg"),
            ("--ckpt-minutes", args.ckpt_minutes, lambda v: 0 <= v < math.inf, "minutes >= 0 (0: off)"),
            ("--keep", args.keep, lambda v: v >= 1, "at least 1 checkpoint"),
            ("--grid", args.grid, lambda v: v >= 1, "at least 1 image"),
            ("--grid-steps", args.grid_steps, lambda v: v >= 1, "at least 1 step"),
            ("--metric-every", args.metric_every, lambda v: v > 0, "a positive number of kimg"),
            ("--metric-num", args.metric_num, lambda v: v >= 2, "at least 2 samples"),
            ("--metric-steps", args.metric_steps, lambda v: v >= 1, "at least 1 step")):
        if v is not None and not (v == v and ok(v)):  # v == v: NaN fails
            raise SystemExit(f"error: {flag}: expected {what}, got {v}")
    network = copy.deepcopy(r.get("network", {}))
    channel_mult = r["channel_mult"]
    if args.cbase is not None:
        if args.cbase < 1:
            raise SystemExit(f"error: --cbase: expected a positive channel count, got {args.cbase}")
        network["model_channels"] = args.cbase
    if args.cres is not None:
        try:
            channel_mult = tuple(int(v) for v in args.cres.split(","))
            if not channel_mult or min(channel_mult) < 1:
                raise ValueError
        except ValueError:
            raise SystemExit(f"error: --cres: expected positive integers separated by commas (e.g. 1,2,2,2), "
                             f"got {args.cres!r}") from None
    mult = channel_mult or (1, 2, 2, 2)  # song_unet's default
    if args.resolution is not None:
        q = 2 ** (len(mult) - 1)  # the UNet halves the resolution len(channel_mult) - 1 times
        if args.resolution < q or args.resolution % q:
            raise SystemExit(f"error: --resolution: expected a multiple of {q} (the network downsamples "
                             f"{len(mult) - 1} times), got {args.resolution}")
    snap = args.snap or max(kimg / 10, batch / 1000)
    return Options(
        ds=args.ds, data=args.data, outdir=args.outdir or os.path.join("runs", f"{name}-{args.precond}-{args.arch}"),
        precond=args.precond, arch=args.arch, cond=args.cond, kimg=kimg, batch=batch, batch_gpu=args.batch_gpu,
        lr=args.lr if args.lr is not None else r["lr"],
        lr_rampup=args.lr_rampup if args.lr_rampup is not None else r["lr_rampup"],
        ema=args.ema if args.ema is not None else r["ema"], ema_rampup=args.ema_rampup,
        dropout=args.dropout if args.dropout is not None else r["dropout"],
        augment=args.augment if args.augment is not None else r["augment"],
        xflip=args.xflip if args.xflip is not None else r["xflip"], warmup_ite=warm,
        fdm_multiplier=args.fdm_multiplier,
        compile=args.compile if args.compile is not None else torch.cuda.is_available(),
        precision=args.precision if args.precision != "auto" else default_precision(),
        tf32=args.tf32, seed=args.seed, resume=args.resume,
        tick=args.tick or max(kimg / 100, batch / 1000), snap=snap, ckpt=args.ckpt or snap, keep=args.keep,
        grid=args.grid, grid_steps=args.grid_steps, resolution=args.resolution, backend=args.backend,
        channel_mult=channel_mult, network=network, exact_reduce=args.exact_reduce,
        data_on_device=args.data_on_device, metric=args.metric,
        metric_every=(args.metric_every or snap) if args.metric else None, metric_num=args.metric_num,
        metric_steps=args.metric_steps, inception=args.inception, ref=args.ref, cond_drop=args.cond_drop,
        ckpt_minutes=args.ckpt_minutes, transfer=args.transfer)


# ------------------------------------------------------------------------------------------------
# The loop: set-up, the step, bookkeeping.


@dataclasses.dataclass
class Run:
    """Everything one rank's training holds between steps."""

    o: Options
    rank: int
    world: int
    device: torch.device
    dataset: object
    config: dict
    net: torch.nn.Module  # the Denoiser whose parameters train
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    model: torch.nn.Module  # net.model, wrapped by DDP and/or torch.compile
    train_net: torch.nn.Module  # a Denoiser around ``model`` (shares net's parameters)
    order: GlobalOrder
    images: torch.Tensor  # uint8 [N, C, H, W] on the host (pinned on CUDA)
    labels: Optional[torch.Tensor]  # [N, label_dim] on the device, or None
    augment: Optional[AugmentPipe]
    rounds: int
    batch_gpu: int
    batch_gpu_total: int
    net_dtype: torch.dtype
    per_sample: int
    step: int = 0
    cur_nimg: int = 0


def setup(o: Options, *, rank: int = 0, world: int = 1, device=torch.device("cpu"), log=lambda *a: None) -> Run:
    """Data, network, EMA, optimizer and (with ``o.resume``) the checkpoint's state: a Run at its first step."""
    device = ops.canonical_device(device)  # "cuda" -> "cuda:0": the step compares tensors' devices with it
    torch.backends.cuda.matmul.allow_tf32 = o.tf32
    torch.backends.cudnn.allow_tf32 = o.tf32
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels (as EDM does)
    # Value checks read tensors (a sync per op call on a GPU): on for the CPU, off on accelerators.
    ops.set_value_checks(device.type == "cpu")

    dataset = open_dataset(o.ds, o.data, use_labels=o.cond, resolution=o.resolution)
    if o.cond and not dataset.label_dim:
        raise DatasetError(f"--cond: {o.data or o.ds} has no labels (dataset.json)")
    batch_gpu_total, batch_gpu, rounds = split_batch(o.batch, o.batch_gpu, world)

    network = dict(o.network)
    network["dropout"] = o.dropout
    if o.cond_drop:
        network["label_dropout"] = o.cond_drop
    if o.channel_mult is not None:
        network.setdefault("channel_mult", tuple(o.channel_mult))
    precond_options = {"fdm_multiplier": o.fdm_multiplier} if o.fdm_multiplier is not None else {}
    config = dict(precond=o.precond, precond_options=precond_options, arch=o.arch,
                  img_resolution=dataset.resolution, img_channels=dataset.num_channels,
                  label_dim=dataset.label_dim if o.cond else 0, augment_dim=AUGMENT_DIM if o.augment > 0 else 0,
                  network=network)
    augment = AugmentPipe(p=o.augment) if o.augment > 0 else None
    torch.manual_seed(o.seed)
    net = build_denoiser(config).to(device).train()
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    # the EMA copy after the layout change: same strides as net, so the foreach lerp stays on its fast path
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=o.lr, betas=(0.9, 0.999), eps=1e-8,
                           fused=device.type == "cuda")
    net_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[o.precision]

    step, cur_nimg = 0, 0
    if rank == 0:
        os.makedirs(o.outdir, exist_ok=True)
        for name in remove_stale_temp_files(o.outdir):
            log(f"removed {name}, a temporary file an interrupted write left behind")
    state, resume = None, o.resume
    if resume == "auto":
        found = newest_valid_checkpoint(o.outdir, log=log)
        if found is None:
            log(f"--resume auto: no usable checkpoint in {o.outdir}, starting a new run")
        else:
            resume, state = found
    elif resume:
        try:
            state = load_state(resume)
        except SnapshotError as e:
            raise SystemExit(f"error: --resume {e}") from None
    if state is not None:
        theirs, ours = normalise_config(state["config"]), normalise_config(config)
        if theirs != ours:
            diff = "\n".join(f"  {k}: {a!r} in the checkpoint, {b!r} in this run"
                             for k, a, b in config_differences(theirs, ours))
            raise SystemExit(f"error: --resume {resume}: the checkpoint's network/precond config differs from this "
                             f"run's (give the options it was trained with, or a new --outdir):\n{diff}")
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, cur_nimg = state["step"], state["cur_nimg"]
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        log(f"resumed from {resume} at step {step} ({cur_nimg / 1000:.1f} kimg)")
        if state.get("batch", o.batch) != o.batch:  # allowed: the run goes on from the images seen
            log(f"--batch {o.batch}: the checkpoint was trained with --batch {state['batch']}; the EMA half-life, "
                "learning-rate ramp-up and data order go on by images seen, the FDM warm-up by optimizer steps")
        if rank == 0:
            _truncate_stats(os.path.join(o.outdir, "stats.jsonl"), step)
        if o.transfer:
            log(f"--transfer {o.transfer}: not applied, the run resumes its own checkpoint")
    elif o.transfer:
        transfer_weights(o.transfer, net, ema, log)
    if len(dataset) < 1:
        raise DatasetError(f"{o.data or o.ds}: the dataset has no images")
    if o.metric:  # before any training: a metric that cannot score this data is an error now
        check_metric(o.metric, resolution=dataset.resolution, channels=dataset.num_channels, inception=o.inception,
                     ref=o.ref)
    order = GlobalOrder(len(dataset), o.seed)

    images = place_images(dataset.images_as_tensor(), device, o.data_on_device, log)
    labels = None
    if o.cond:
        labels = torch.from_numpy(np.stack([dataset[i][1] for i in range(len(dataset))])).to(device)

    model = net.model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None, **_ddp_no_buffer_sync())
        model.register_comm_hook(None, _ordered_sum_hook if o.exact_reduce else _sum_hook)
    if o.compile:
        model = torch.compile(model)
    train_net = type(net)(net.precond, model, config)  # shares parameters with net
    return Run(o=o, rank=rank, world=world, device=device, dataset=dataset, config=config, net=net, ema=ema, opt=opt,
               model=model, train_net=train_net, order=order, images=images, labels=labels, augment=augment,
               rounds=rounds, batch_gpu=batch_gpu, batch_gpu_total=batch_gpu_total, net_dtype=net_dtype,
               per_sample=dataset.num_channels * dataset.resolution**2, step=step, cur_nimg=cur_nimg)


def ema_beta(half_life_mimg: float, rampup: Optional[float], batch: int, cur_nimg: int) -> float:
    """EDM's EMA decay for the step that starts with ``cur_nimg`` images seen: beta = 0.5^(batch / h),
    h = min(half-life, cur_nimg * rampup). Step 0 gives beta = 0: the EMA starts as the network."""
    half = half_life_mimg * 1e6
    if rampup:
        half = min(half, cur_nimg * rampup)
    return 0.5 ** (batch / max(half, 1e-8))


def _truncate_stats(path: str, step: int) -> None:
    """Drop stats rows of steps after the resumed checkpoint, so the log reads as one run."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a kill
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def transfer_weights(path: str, net, ema, log=print) -> None:
    """Copy a snapshot's EMA weights into ``net`` and ``ema`` (their own layouts kept), as EDM's --transfer;
    SystemExit naming --transfer when the file does not load or its tensors differ in name or shape."""
    try:
        src = load_snapshot(path)
    except SnapshotError as e:
        raise SystemExit(f"error: --transfer {e}") from None
    ours, theirs = net.state_dict(), src.state_dict()
    bad = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape] + [k for k in theirs
                                                                                      if k not in ours]
    if bad:
        diff = "\n".join(f"  {k}: {a!r} in the snapshot, {b!r} in this run" for k, a, b in config_differences(
            _shape_config(src.config), _shape_config(net.config)))
        raise SystemExit(f"error: --transfer {path}: its network does not fit this run's ({len(bad)} of "
                         f"{len(ours)} tensors differ in name or shape, e.g. {', '.join(bad[:3])})"
                         + (f"; the configs differ in:\n{diff}" if diff else ""))
    net.load_state_dict(theirs)
    ema.load_state_dict(theirs)
    log(f"weights from {path} (the EMA of a {src.precond.name} {src.config.get('arch')} network); "
        "optimizer and step start anew")


def _shape_config(config: dict) -> dict:
    """The parts of a config that decide the network's tensors (not its dropouts, its attention kernel or the
    preconditioning)."""
    c = normalise_config({k: config.get(k, 0) for k in ("arch", "img_resolution", "img_channels", "label_dim",
                                                        "augment_dim")})  # label_dim, augment_dim: 0 if absent
    network = normalise_config(network_settings(config.get("arch"), config.get("network") or {}))
    c["network"] = {k: v for k, v in network.items() if k not in ("dropout", "label_dropout", "attention")}
    return c


def config_differences(a: dict, b: dict, prefix: str = ""):
    """(dotted key, value in a, value in b) for every leaf where two nested config dicts differ."""
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            yield from config_differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            yield f"{prefix}{k}", va, vb


def _ddp_no_buffer_sync() -> dict:
    """DDP's keyword for "no buffer broadcast before each forward" (the buffers are constants: resampling
    filters, Fourier frequencies): ``forward_sync_buffers`` where DDP has it (torch 2.13, where
    ``broadcast_buffers`` is deprecated with a FutureWarning), else ``broadcast_buffers``."""
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return dict(forward_sync_buffers=False) if "forward_sync_buffers" in params else dict(broadcast_buffers=False)


def _sum_hook(state, bucket):
    """DDP reduction as a sum: every rank's loss is already divided by the global batch, so the sum of
    the ranks' gradients is the single-process gradient (with 2 ranks bitwise: a + b == b + a)."""
    fut = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _ordered_sum_hook(state, bucket):
    """``--exact-reduce``: gather every rank's gradients and add them in rank order, the order in which
    one process accumulates the same slices (world x the traffic of an all-reduce)."""
    buf = bucket.buffer()
    parts = [torch.empty_like(buf) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, buf)
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    fut = torch.futures.Future()
    fut.set_result(total)
    return fut


def place_images(images: torch.Tensor, device: torch.device, mode: str = "auto", log=lambda *a: None) -> torch.Tensor:
    """The uint8 dataset where batches are gathered from: accelerator memory (``mode`` on, or auto and it
    fits in a quarter of the free memory), else the host (pinned on CUDA, for asynchronous copies)."""
    if device.type == "cpu" or mode == "off":
        return images.pin_memory() if device.type == "cuda" else images
    if mode == "auto":
        if device.type != "cuda":
            return images
        free, _ = torch.cuda.mem_get_info(device)
        if images.nbytes > free / 4:
            log(f"dataset ({images.nbytes / 2**20:.0f} MiB) stays in pinned host memory: more than a quarter of "
                f"the {free / 2**20:.0f} MiB free on {device}")
            return images.pin_memory()
    log(f"dataset ({images.nbytes / 2**20:.0f} MiB) kept on {device}; batches are indexed there")
    return to_device(images, device)


def _gather(run: Run, idx_t: torch.Tensor, idx_dev: Optional[torch.Tensor]) -> torch.Tensor:
    """The uint8 images of ``idx_t`` (host indices; ``idx_dev``: the same on the device) on the
    device: indexed there when the dataset lives there, else gathered on the host into a pinned
    buffer (on CUDA) and copied asynchronously."""
    if run.images.device == run.device:
        return run.images.index_select(0, idx_dev)
    if run.device.type == "cuda":
        buf = torch.empty((len(idx_t), *run.images.shape[1:]), dtype=torch.uint8, pin_memory=True)
        torch.index_select(run.images, 0, idx_t, out=buf)
        return buf.to(run.device, non_blocking=True)
    return to_device(run.images[idx_t], run.device)


def train_step(run: Run) -> torch.Tensor:
    """One optimizer step (data slice -> augment -> loss -> backward -> optimizer -> EMA) over
    ``run.rounds`` accumulation rounds. Returns this rank's summed per-sample loss as a device scalar:
    nothing here reads a device tensor or copies host data synchronously (tests/test_sync_free.py)."""
    o, device, net = run.o, run.device, run.net
    run.opt.zero_grad(set_to_none=True)
    clamp = fdm_clamp(net, run.step, o.warmup_ite)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    # this rank's slice of the step's global batch (data/order.py); a sample's key is its global position,
    # counted in images seen (not step x batch: a run resumed with another --batch would repeat samples)
    first = run.cur_nimg + run.rank * run.batch_gpu_total
    for r in range(run.rounds):
        start = first + r * run.batch_gpu
        idx = run.order.indices(start, run.batch_gpu)
        keys = np.arange(start, start + run.batch_gpu, dtype=np.int64)
        # dropout draws from torch's generator: seed it from the round's first position, so the same
        # slice of the global batch gets the same masks on any rank and after a resume
        torch.manual_seed(int(np.random.SeedSequence([o.seed, start]).generate_state(1, np.uint64)[0] >> 1))
        idx_t = torch.from_numpy(idx)
        # the indices on the device, copied once, when the dataset or the labels live there
        idx_dev = to_device(idx_t, device) if run.images.device == device or run.labels is not None else None
        y = _gather(run, idx_t, idx_dev).to(torch.float32) / 127.5 - 1
        keys_host = torch.from_numpy(keys)
        # this sample's sigma, flip and augmentation, keyed by its global index (computed on the host)
        u = sample_uniforms(o.seed, keys_host, 2 + (NUM_UNIFORMS if run.augment else 0))
        u_dev = to_device(u[:, :2], device)
        if o.xflip:
            y = torch.where((u_dev[:, 1] < 0.5).reshape(-1, 1, 1, 1), y.flip(3), y)
        if device.type == "cuda":
            y = y.contiguous(memory_format=torch.channels_last)
        aug_labels = None
        if run.augment is not None:
            y, aug_labels = run.augment(y, u[:, 2:])  # host uniforms: the padding margin is read on the host
            y = y.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else y.contiguous()
        labels = run.labels[idx_dev] if run.labels is not None else None
        sigma = net.precond.sigma_from_uniform(u_dev[:, 0]).to(torch.float32)
        seed, offset = noise_rng(o.seed, to_device(keys_host, device), run.per_sample, device)
        sync = run.world == 1 or r == run.rounds - 1
        ctx = run.model.no_sync() if (run.world > 1 and not sync and hasattr(run.model, "no_sync")) else _null()
        with ctx:
            loss = training_loss(run.train_net, y, sigma, seed=seed, offset=offset, clamp=clamp, labels=labels,
                                 augment_labels=aug_labels, net_dtype=run.net_dtype, backend=o.backend)
            (loss.sum() / o.batch).backward()  # ranks' gradients are summed (_sum_hook), not averaged
        loss_sum += loss.detach().sum()
    for g in run.opt.param_groups:
        g["lr"] = o.lr * min(run.cur_nimg / max(o.lr_rampup * 1e6, 1e-8), 1)
    for p in net.parameters():  # non-finite gradients zeroed / clipped, as EDM does
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    run.opt.step()
    beta = ema_beta(o.ema, o.ema_rampup, o.batch, run.cur_nimg)  # from the images seen before this step
    run.step += 1
    run.cur_nimg += o.batch
    with torch.no_grad():
        torch._foreach_lerp_(list(run.ema.parameters()), [p.detach() for p in net.parameters()], 1 - beta)
    return loss_sum


def write_snapshot(run: Run) -> str:
    """The EMA network and its config (``network-snapshot-*.pt``), and a grid of samples from it."""
    o, config, device = run.o, run.config, run.device
    name = snapshot_name(run.cur_nimg, o.outdir)
    snap_path = os.path.join(o.outdir, name)
    atomic_save(dict(config=config, ema=run.ema.state_dict(), step=run.step, cur_nimg=run.cur_nimg), snap_path)
    seeds = list(range(o.grid))
    labels = seed_labels(seeds, config["label_dim"], device)
    images = edm_sampler(run.ema, seeds, num_steps=o.grid_steps, class_labels=labels,
                         backend=o.backend, device=device)
    save_grid(images, os.path.join(o.outdir, "samples" + name[len("network-snapshot"):-len(".pt")] + ".png"))
    plot_training(o.outdir, o.precond)
    return snap_path


def plot_training(outdir: str, precond: str) -> Optional[str]:
    """training.png in a run folder: the loss (each tick's mean, log scale) and the speed (img/s) against
    kimg, from stats.jsonl; redrawn with every snapshot. None before the first tick."""
    recs = read_tick_records(os.path.join(outdir, "stats.jsonl"))
    if not recs:
        return None
    kimg = [r["kimg"] for r in recs]
    return subplots(os.path.join(outdir, "training.png"), [
        dict(series=[dict(x=kimg, y=[r["loss"] for r in recs], label=f"{precond} loss")], logy=True,
             title="training loss, mean over each tick (FDM's warm-up caps its weight early on)",
             xlabel="training kimg", ylabel="loss"),
        dict(series=[dict(x=kimg, y=[r.get("img_per_s") for r in recs], label="img/s", color=2)],
             title="training speed per tick (time spent compiling, on snapshots and on evaluations included)",
             xlabel="training kimg", ylabel="img/s"),
    ], cols=2)


def evaluate(run: Run, evaluator: SampleEvaluator) -> dict:
    """Score the EMA network (``--metric``): a record appended to stats.jsonl and metrics.png redrawn."""
    o = run.o
    values = evaluator(run.ema)
    rec = dict(kimg=run.cur_nimg / 1000, step=run.step, metric=o.metric, time=time.time(), **values)
    stats_path = os.path.join(o.outdir, "stats.jsonl")
    with open(stats_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    recs = read_metric_records(stats_path, o.metric)
    key = evaluator.primary
    line_plot(os.path.join(o.outdir, "metrics.png"),
              [dict(x=[r["kimg"] for r in recs], y=[r[key] for r in recs], label=f"{o.precond} {key}")],
              title=f"{o.metric}: {key} of the EMA network, {evaluator.num} samples, NFE {evaluator.nfe} "
                    f"(lower is better)", xlabel="training kimg", ylabel=key)
    return rec


def write_checkpoint(run: Run) -> str:
    """Everything a resume needs (``training-state-*.pt``); keeps the newest ``--keep``."""
    o, device = run.o, run.device
    path = os.path.join(o.outdir, f"training-state-{run.step:08d}.pt")
    atomic_save(dict(net=run.net.state_dict(), ema=run.ema.state_dict(), opt=run.opt.state_dict(), step=run.step,
                     cur_nimg=run.cur_nimg, batch=o.batch, torch_rng=torch.get_rng_state(),
                     cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     config=normalise_config(run.config)), path)
    for old in checkpoints(o.outdir)[:-o.keep]:
        remove(old)
    return path


# With several ranks: how often they agree on a stop request (one small all-reduce). About every
# STOP_SYNC_S seconds, and at most every STOP_SYNC_STEPS steps: fast steps share one agreement, a slow
# step (a big model, accumulation rounds) gets one after every step, so a stop never waits for many of
# them (torchrun SIGKILLs its workers 30 s after passing a signal on, by default).
STOP_SYNC_STEPS = 10
STOP_SYNC_S = 1.0


def stop_sync_interval(step_s: float) -> int:
    """Steps until the next agreement on a stop request, given the slowest rank's seconds per step."""
    if not step_s > 0:  # nothing measured yet (or a clock that did not move)
        return 1
    return max(1, min(STOP_SYNC_STEPS, int(STOP_SYNC_S / step_s)))


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler preempting the job) while training: finish the current
    step, write a training state, end the run; ``--resume auto`` continues it exactly.

    A repeat of a signal within ``repeat_window_s`` of the first is ignored: torchrun passes the
    terminal's Ctrl-C on to its workers, which the terminal has already signalled, so each worker sees
    it twice. A later repeat during the step aborts at once (KeyboardInterrupt, Python's own
    behaviour), for a step that does not finish. Once the stop is decided (``requested`` returned a
    signal) the step is done and the state is being written: repeats are then ignored, since aborting
    would only lose that state (torchrun SIGTERMs the workers still running as soon as one of them exits
    with a non-zero status, which a stopping rank does), and ``all_stopped`` keeps every rank alive until
    rank 0 has written it. With several ranks the request is all-reduced after the first step and then
    about every STOP_SYNC_S seconds (every 1 to STOP_SYNC_STEPS steps, from the slowest rank's step
    time, itself all-reduced, so every rank agrees on the steps), so all ranks stop after the same
    step, whichever of them got the signal; one process checks every step and communicates nothing.
    Handlers are installed by ``arm()`` (just before the first step) and the previous ones restored on
    exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce=lambda msg: None, repeat_window_s: float = 1.0):
        self.signum, self.t_first = 0, None
        self.finishing = False  # the stop is decided: the state is being written, repeats are ignored
        self.announce, self.repeat_window_s = announce, repeat_window_s
        self._previous = {}
        self._group = None
        self._next_sync = None  # with several ranks: the step of the next agreement (None: the first step)
        self._synced = None  # (step, time.monotonic()) of the last agreement

    def arm(self) -> "StopRequest":
        """Install the handlers, except for a signal the process was started ignoring (a background job of
        a script, ``cmd &``, where the shell sets SIGINT to SIG_IGN): that one stays ignored."""
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in self.SIGNALS:
                if s not in self._previous and signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.finishing:
            self.announce(f"{name} again: the step is done and the training state is being written; "
                          "not interrupting that (SIGKILL would lose it)")
        elif not self.signum:
            self.signum, self.t_first = signum, now
            self.announce(f"{name}: stopping after this step and writing a training state (--resume auto "
                          "continues from it); a second Ctrl-C during the step aborts at once, without one")
        elif now - self.t_first > self.repeat_window_s:
            raise KeyboardInterrupt(f"{name} again: aborted without writing a training state")

    def requested(self, step: int, world: int = 1) -> int:
        """The number of the signal to stop for, or 0 to go on; the same on every rank. Called after every
        step, by every rank, with the same ``step``."""
        if world == 1:
            self.finishing = bool(self.signum)
            return self.signum
        if self._next_sync is not None and step < self._next_sync:
            return 0
        if self._group is None:  # every rank gets here at the same step: a collective call is safe
            # a CPU (gloo) group of its own: a host flag all-reduced on the CPU, which waits for no GPU
            # work (a CUDA tensor read back would drain the stream at every agreement)
            self._group = torch.distributed.new_group(backend="gloo")
        now = time.monotonic()
        step_s = (now - self._synced[1]) / max(step - self._synced[0], 1) if self._synced else 0.0
        t = torch.tensor([float(self.signum), step_s], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self._group)
        signum, step_s = int(t[0]), float(t[1])  # the same on every rank, and so is the next step below
        self._next_sync = step + stop_sync_interval(step_s)
        self._synced = (step, time.monotonic())
        if signum:
            self.signum = self.signum or signum  # a rank that got no signal itself stops for its peer's
            self.finishing = True
        return signum

    def all_stopped(self, world: int) -> None:
        """After a stop, wait until every rank is here (rank 0 has written the training state), so that
        none exits before it: torchrun would SIGTERM the others at once and SIGKILL them 30 s later
        (its --shutdown-timeout), however far the write had got. One process: nothing to wait for."""
        if world > 1 and self._group is not None:
            torch.distributed.barrier(group=self._group)


def _announce(msg: str) -> None:
    """A line on stderr from a signal handler: os.write, not print, which raises 'reentrant call' when the
    signal lands while the main thread is writing to sys.stderr (the progress bar does, constantly)."""
    try:
        os.write(2, f"\n{msg}\n".encode())
    except OSError:
        pass


def exit_status(result: dict) -> int:
    """The process's exit status for a training_loop result: 0, or 128 + the signal that stopped it."""
    return 128 + int(result["stopped_by"]) if result.get("stopped_by") else 0


def training_loop(o: Options, *, rank: int = 0, world: int = 1, device=torch.device("cpu"), quiet: bool = False,
                  stop_after_steps: Optional[int] = None) -> dict:
    """Train per ``o``; returns a summary dict. ``stop_after_steps`` ends early (tests). SIGINT / SIGTERM
    end the run after the current step with a training state (StopRequest); ``stopped_by`` in the
    summary is then that signal (else None). Rank 0 holds ``o.outdir``'s run lock throughout: a second run
    in the same folder is refused (RunLocked) before it changes anything there."""
    lock = run_lock(o.outdir) if rank == 0 else contextlib.nullcontext()
    with lock, StopRequest(_announce if rank == 0 else (lambda msg: None)) as stopper:
        return _training_loop(o, rank=rank, world=world, device=device, quiet=quiet,
                              stop_after_steps=stop_after_steps, stopper=stopper)


def _training_loop(o: Options, *, rank: int, world: int, device, quiet: bool, stop_after_steps: Optional[int],
                   stopper: StopRequest) -> dict:
    log = (lambda *a: print(*a, flush=True)) if rank == 0 and not quiet else (lambda *a: None)
    run = setup(o, rank=rank, world=world, device=device, log=log)
    device = run.device  # canonical ("cuda" -> "cuda:0")
    dataset, config, net, ema = run.dataset, run.config, run.net, run.ema

    if rank == 0:
        with open(os.path.join(o.outdir, "options.json"), "w") as f:
            json.dump(dict(options=dataclasses.asdict(o), config=config, world=world, device=str(device),
                           backend=ops.select_backend(device, o.backend), parameters=count_parameters(net.model),
                           dataset=dict(name=dataset.name, size=len(dataset), resolution=dataset.resolution,
                                        channels=dataset.num_channels, label_dim=dataset.label_dim)), f, indent=2)
    log(f"network: {o.arch} {config['img_resolution']}x{config['img_resolution']}x{config['img_channels']}, "
        f"{count_parameters(net.model):,} parameters; precond {o.precond}; data {dataset.name} ({len(dataset)} images)")
    emulated = " (bf16 has no fast kernels on this device)" if o.precision == "fp32" and not bf16_native(
        device.type) else ""
    log(f"device {device}, {world} rank(s), backend {ops.select_backend(device, o.backend)}, precision {o.precision}"
        f"{emulated}, batch {o.batch} = {world} x {run.rounds} x {run.batch_gpu}, compile {o.compile}")

    resumed = run.step > 0
    total_nimg = int(o.kimg * 1000)
    stats_path = os.path.join(o.outdir, "stats.jsonl")
    next_tick = run.cur_nimg + o.tick * 1000
    next_snap = run.cur_nimg + o.snap * 1000 if resumed else o.snap * 1000
    next_ckpt = run.cur_nimg + o.ckpt * 1000
    # rank 0 alone writes checkpoints, so a clock of its own decides the timed ones (no agreement needed)
    ckpt_every_s = o.ckpt_minutes * 60 if o.ckpt_minutes else math.inf
    ckpt_due = time.monotonic() + ckpt_every_s
    evaluator, next_metric = None, None
    if o.metric and rank == 0:
        evaluator = SampleEvaluator(o.metric, num=o.metric_num, steps=o.metric_steps, device=device,
                                    inception=o.inception, ref=o.ref, log=log)
        every = o.metric_every * 1000
        next_metric = (run.cur_nimg // every + 1) * every  # on multiples of --metric-every, resumed or not
    tick_loss = torch.zeros((), dtype=torch.float64, device=device)  # read once per tick, not per step
    tick_n, tick_t0, tick_nimg = 0, time.time(), run.cur_nimg
    start_step = run.step
    bar = None
    if rank == 0 and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=total_nimg, initial=min(run.cur_nimg, total_nimg), unit="img", unit_scale=True,
                   dynamic_ncols=True, mininterval=2.0)
    last_loss = float("nan")
    stop, ckpt_path = 0, None
    stopper.arm()

    while run.cur_nimg < total_nimg and (stop_after_steps is None or run.step - start_step < stop_after_steps):
        clamp = fdm_clamp(net, run.step, o.warmup_ite)
        tick_loss += train_step(run)
        tick_n += run.batch_gpu_total
        cur_nimg = run.cur_nimg
        if bar is not None:
            bar.update(min(o.batch, total_nimg - bar.n))
        done = cur_nimg >= total_nimg
        stop = 0 if done else stopper.requested(run.step, world)
        if cur_nimg >= next_tick or done or stop:
            if world > 1:
                t = torch.stack([tick_loss, torch.full((), float(tick_n), dtype=torch.float64, device=device)])
                torch.distributed.all_reduce(t)
                total_loss, total_n = t.tolist()  # the one read of the loss per tick
            else:
                total_loss, total_n = tick_loss.item(), tick_n
            now = time.time()
            last_loss = total_loss / max(total_n, 1)
            rec = dict(kimg=cur_nimg / 1000, step=run.step, loss=last_loss, lr=run.opt.param_groups[0]["lr"],
                       img_per_s=(cur_nimg - tick_nimg) / max(now - tick_t0, 1e-9), clamp=clamp,
                       time=now)
            if rank == 0:
                with open(stats_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.set_postfix_str(f"loss {last_loss:.4g}, {rec['img_per_s']:.0f} img/s")
            tick_loss.zero_()
            tick_n, tick_t0, tick_nimg = 0, now, cur_nimg
            next_tick += o.tick * 1000
        if rank == 0 and (cur_nimg >= next_snap or done):
            write_snapshot(run)
            next_snap += o.snap * 1000
        if evaluator is not None and (cur_nimg >= next_metric or done):
            rec = evaluate(run, evaluator)
            log(f"\n{o.metric} at {rec['kimg']:g} kimg: {evaluator.primary} {rec[evaluator.primary]:.4g} "
                f"({rec['seconds']:.1f} s)")
            while next_metric <= cur_nimg:
                next_metric += o.metric_every * 1000
        if rank == 0 and (cur_nimg >= next_ckpt or done or stop or time.monotonic() >= ckpt_due):
            ckpt_path = write_checkpoint(run)
            if cur_nimg >= next_ckpt:
                next_ckpt += o.ckpt * 1000
            ckpt_due = time.monotonic() + ckpt_every_s
        if stop:
            break
    if bar is not None:
        bar.close()
    if rank == 0 and stop_after_steps is not None and not stop and not (run.cur_nimg >= total_nimg):
        write_checkpoint(run)
    if stop:
        if rank == 0:
            eprint(f"stopped by {signal.Signals(stop).name} after step {run.step} ({run.cur_nimg / 1000:g} kimg); "
                   f"training state {ckpt_path}: run the same command with --resume auto to continue")
        # after the line, so that whatever a rank prints once it is through comes after it
        stopper.all_stopped(world)
    return dict(step=run.step, cur_nimg=run.cur_nimg, loss=last_loss, net=net, ema=ema, stopped_by=stop or None)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def bf16_native(device_type: str) -> bool:
    """Whether bf16 autocast has real kernels on this machine's ``device_type`` ("cuda" or "cpu"): a GPU of
    compute capability 8.0 or later (earlier ones emulate bf16), or a CPU on which oneDNN has bf16 kernels
    (AVX-512, natively with AVX512-BF16 or AMX). Without them a CPU runs bf16 convolutions in slow fallback
    code: on a Zen 3 EPYC (AVX2) a 3x3 convolution took 62x its fp32 time, a digits training step 10x."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    if device_type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch build without the probe: not known to be fast
            return False
    return False


def default_precision() -> str:
    """--precision auto: bf16 where the device train uses (CUDA if there is one, else the CPU) computes it."""
    return "bf16" if bf16_native("cuda" if torch.cuda.is_available() else "cpu") else "fp32"


def split_batch(batch: int, batch_gpu: Optional[int], world: int) -> tuple[int, int, int]:
    """(per-rank batch, per-round batch, rounds) of ``batch`` images per step over ``world`` ranks, each rank
    in rounds of ``batch_gpu`` (None: one round); SystemExit naming the flag when they do not divide."""
    batch_gpu_total = batch // world
    if batch_gpu_total * world != batch:
        raise SystemExit(f"error: --batch {batch} is not divisible by the {world} ranks")
    batch_gpu = batch_gpu or batch_gpu_total
    rounds = batch_gpu_total // batch_gpu
    if rounds * batch_gpu != batch_gpu_total:
        raise SystemExit(f"error: --batch-gpu {batch_gpu} does not divide the per-rank batch {batch_gpu_total}"
                         f" (--batch {batch} over {world} rank{'s' if world > 1 else ''})")
    return batch_gpu_total, batch_gpu, rounds


def main(argv=None):
    args = parse_args(argv)  # argparse's own errors exit with status 2
    try:
        return _main(args)
    except SystemExit as e:  # our errors: the message on stderr, status 2, no traceback
        if isinstance(e.code, str):
            eprint(e.code)
            return 2
        raise


def _main(args) -> int:
    o = resolve(args)
    rank, world, device = init_distributed()
    try:
        ops.select_backend(device, o.backend)  # an unknown or unavailable backend: say so before any work
    except ValueError as e:
        raise SystemExit(f"error: --backend {o.backend}: {e}") from None
    split_batch(o.batch, o.batch_gpu, world)  # a batch the ranks cannot split: refused by --dry-run too
    if rank == 0:
        print(json.dumps(dataclasses.asdict(o), indent=2, default=str))
    if args.dry_run:
        return 0
    made = missing_folders(o.outdir) if rank == 0 else []
    if rank == 0:
        why = cannot_write_in(o.outdir)
        if why is not None:
            raise SystemExit(f"error: --outdir {o.outdir}: {why}")
    try:
        result = training_loop(o, rank=rank, world=world, device=device)
    except WriteError as e:  # a full disk, say: the run stops with its files as they were before the write
        have = checkpoints(o.outdir)
        eprint(f"error: {e}; " + (f"the newest checkpoint is {have[-1]}: make room, then run the same command with "
                                  "--resume auto" if have else "no checkpoint was written yet"))
        return 1
    except (DatasetError, SnapshotError, MetricError) as e:
        eprint(f"error: {e}")
        return 2
    finally:
        shutdown_distributed()
        remove_empty_folders(made)  # a run refused before it wrote anything (a bad --data, say) leaves no folder
    if rank == 0 and not result["stopped_by"]:
        print(f"done: checkpoints, snapshots and sample grids in {o.outdir}\n"
              f"sample its newest snapshot: python -m fdm_fast.generate --network {shlex.quote(o.outdir)} "
              f"--seeds 0-63 --grid {shlex.quote(os.path.join(o.outdir, 'generated.png'))}")
    return exit_status(result)


if __name__ == "__main__":
    sys.exit(main())
