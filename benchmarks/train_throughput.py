"""Training images/s, from the official code's step to fdm_fast's, one change per row, in one
interleaved run (a slow phase of a shared machine hits every row alike; first steps, which include
compilation, are reported apart):

  official                 what sail-sg/FDM / NVlabs/edm do: fp32, TF32 off, cudnn.benchmark on, the
                           op-by-op loss with torch.randn_like noise, EDM's einsum attention in fp32,
                           torch.optim.Adam with torch's default implementation for the device, the EMA
                           updated parameter by parameter, each batch indexed on the host and copied
  + bf16 autocast          the network under bf16 autocast, TF32 on
  + SDPA attention         F.scaled_dot_product_attention instead of the einsum (math still fp32)
  + channels_last          network and data in channels_last
  + torch.compile          the network compiled (default mode; skipped with --no-compile)
  + fused ops              fdm_fast's perturb and loss (noise regenerated, one pass each way)
  + fused Adam, foreach EMA
  fdm_fast train_step      the step `python -m fdm_fast.train` runs (train.setup + train.train_step:
                           all of the above, and the dataset kept in GPU memory when it fits), in the
                           precision train picks: bf16 where the device has bf16 kernels, else fp32 (an
                           AVX2 CPU: its "+ bf16 autocast" rows run emulated bf16, many times slower)

Each row has its own network, optimizer and EMA from the same initialisation. Presets: ffhq64 (64x64
DDPM++, channel mults 1,2,2,2, dropout 0.05; `--ds synthetic` images of that size), cifar (32x32 DDPM++,
2,2,2, dropout 0.13), digits (the small digits network, 16x16x1; the CPU default). Defaults: on a GPU
ffhq64, batch 64; on a CPU digits, batch 64.

    python benchmarks/train_throughput.py                 # prints the table; writes nothing
    python benchmarks/train_throughput.py --results       # also appends the rows to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (add_results_arg, append_results, check_outputs, deadline_after, machine_name,  # noqa: E402
                      print_table, time_interleaved, write_json)  # noqa: E402

from fdm_fast import ops, train  # noqa: E402
from fdm_fast.data import open_dataset  # noqa: E402
from fdm_fast.loss import fdm_clamp, training_loss  # noqa: E402
from fdm_fast.nn import Denoiser, build_denoiser, count_parameters  # noqa: E402
from fdm_fast.schedules import PRECONDS  # noqa: E402

PRESETS = {
    "ffhq64": dict(img_resolution=64, img_channels=3, network=dict(channel_mult=(1, 2, 2, 2), dropout=0.05)),
    "cifar": dict(img_resolution=32, img_channels=3, network=dict(channel_mult=(2, 2, 2), dropout=0.13)),
    "digits": dict(img_resolution=16, img_channels=1, network=dict(model_channels=32, channel_mult=(1, 2, 2),
                                                                   num_blocks=2, attn_resolutions=(8,), dropout=0.0)),
}
STEPS = ["bf16", "sdpa", "channels_last", "compile", "fused_ops", "fused_adam"]
LABELS = {"bf16": "+ bf16 autocast", "sdpa": "+ SDPA attention", "channels_last": "+ channels_last",
          "compile": "+ torch.compile", "fused_ops": "+ fused ops", "fused_adam": "+ fused Adam, foreach EMA"}


def ablation_rows(compile: bool) -> dict:
    """{label: flags} of the rows from official-style on, each adding one change to the row above.
    Without ``compile`` the compile row is left out, and so is its flag from every later row."""
    rows, flags = {"official": set()}, set()
    for f in STEPS:
        if f == "compile" and not compile:
            continue
        flags = flags | {f}
        rows[LABELS[f]] = set(flags)
    return rows


def preset_of(device: torch.device, args) -> str:
    return args.preset if args.preset != "auto" else ("ffhq64" if device.type == "cuda" else "digits")


def make_step(flags: set, cfg: dict, images: torch.Tensor, device: torch.device, args):
    """One training step of the official code with the changes in ``flags`` applied."""
    net_cfg = dict(cfg, network=dict(cfg["network"], attention="sdpa" if "sdpa" in flags else "einsum"))
    torch.manual_seed(0)
    net = build_denoiser(net_cfg).to(device).train()
    cl = "channels_last" in flags
    if cl:
        net = net.to(memory_format=torch.channels_last)
    ema = [p.detach().clone() for p in net.parameters()]
    model = torch.compile(net.model) if "compile" in flags else net.model
    run_net = Denoiser(net.precond, model, net_cfg)
    if "fused_adam" in flags:
        try:
            opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
        except (RuntimeError, ValueError):  # no fused Adam for this device
            opt = torch.optim.Adam(net.parameters(), lr=1e-4, foreach=True)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)  # torch's default implementation for the device
    p, B = net.precond, args.batch
    bf16 = "bf16" in flags
    clamp = fdm_clamp(net, 10, 400)
    state = dict(step=0)
    g = torch.Generator().manual_seed(1)

    def step():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bf16
        idx = torch.randint(len(images), (B,), generator=g)
        y = images[idx].to(device).to(torch.float32) / 127.5 - 1  # host index + copy, as a DataLoader batch
        if cl:
            y = y.contiguous(memory_format=torch.channels_last)
        sigma = p.sample_sigma(B, device=device)
        state["step"] += 1
        if "fused_ops" in flags:
            loss = training_loss(run_net, y, sigma, seed=1, offset=state["step"] * (y.numel() // 4 + 1), clamp=clamp,
                                 net_dtype=torch.bfloat16 if bf16 else torch.float32)
            (loss.sum() / B).backward()
        else:
            s = sigma.reshape(-1, 1, 1, 1)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                D = run_net(y + torch.randn_like(y) * s, s, dtype=torch.bfloat16 if bf16 else torch.float32)
            w = p.loss_weight(s) if clamp is None else torch.clamp(p.loss_weight(s), max=clamp)
            (w * (D - y) ** 2).sum().mul(1 / B).backward()
        for q in net.parameters():
            if q.grad is not None:
                torch.nan_to_num(q.grad, nan=0, posinf=1e5, neginf=-1e5, out=q.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if "fused_adam" in flags:
                torch._foreach_lerp_(ema, [q.detach() for q in net.parameters()], 1 - 0.999)
            else:  # EDM: p_ema.copy_(p_net.detach().lerp(p_ema, beta)), one parameter at a time
                for pe, q in zip(ema, net.parameters()):
                    pe.copy_(q.detach().lerp(pe, 0.999))

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device to time on (default cuda when there is one, else cpu)")
    ap.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                    help="network and data size (auto: ffhq64 on a GPU, digits on a CPU)")
    ap.add_argument("--precond", default="fdm_edm", choices=list(PRECONDS), help="preconditioning (default fdm_edm)")
    ap.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 30 GPU, 10 CPU)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per row after the first")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="include the torch.compile rows (default: on; compile time is reported apart)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--time-budget", type=float, default=None, metavar="S",
                    help="finish within about S seconds: rows not started by then are reported as skipped, and "
                         "fewer timed steps are taken (at least one per row) instead of losing the run")
    add_results_arg(ap)
    args = ap.parse_args(argv)
    check_outputs(ap, args)
    deadline = deadline_after(None if args.time_budget is None else args.time_budget - 15)  # 15 s: peak memory, table
    for flag, v in (("--batch", args.batch), ("--steps", args.steps or 1), ("--warmup", args.warmup + 1)):
        if v < 1:
            ap.error(f"{flag}: expected a positive integer, got {v}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (30 if cuda else 10)
    preset = preset_of(device, args)
    cfg = dict(PRESETS[preset], precond=args.precond, arch="ddpmpp")

    # fdm_fast's own step first: train.setup sets the process-wide settings train uses (cudnn.benchmark)
    tmp = tempfile.mkdtemp(prefix="fdm_fast_bench_")
    ds = ["--ds", "digits"] if preset == "digits" else ["--ds", "synthetic", "--resolution", str(cfg["img_resolution"])]
    precision = "bf16" if train.bf16_native(device.type) else "fp32"  # train's --precision auto, on this device
    o = train.resolve(train.parse_args([*ds, "--precond", args.precond, "--batch", str(args.batch), "--precision",
                                        precision, "--compile" if args.compile else "--no-compile", "--kimg", "1e6",
                                        "--outdir", tmp, "--augment", "0", "--warmup-ite", "400"]))
    o.network = {k: v for k, v in cfg["network"].items() if k not in ("channel_mult", "dropout")}
    o.channel_mult, o.dropout = cfg["network"]["channel_mult"], cfg["network"]["dropout"]
    t0 = time.perf_counter()
    run = train.setup(o, device=device)
    print(f"train.setup: {time.perf_counter() - t0:.1f} s", flush=True)
    ops.set_value_checks(False)  # setup keeps them on for the CPU; the other rows have none either
    images = open_dataset(o.ds, None, resolution=o.resolution if preset != "digits" else None).images_as_tensor()

    variants = {label: make_step(flags, cfg, images, device, args)
                for label, flags in ablation_rows(args.compile).items()}

    def real():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        train.train_step(run)

    variants["fdm_fast train_step"] = real
    print(f"rows built at {time.perf_counter() - t0:.1f} s", flush=True)
    timed = time_interleaved(variants, device, reps=steps, warmup=args.warmup, log=lambda m: print(m, flush=True),
                             deadline=deadline, info=(info := {}))
    peak = {}
    for k, fn in variants.items():  # peak memory of one more step of each row
        if cuda and k in timed:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            peak[k] = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}"
        else:
            peak[k] = "n/a"
    machine = machine_name(device)
    params = count_parameters(run.net.model)
    desc = f"{cfg['img_resolution']}x{cfg['img_resolution']}x{cfg['img_channels']} DDPM++ ({params:,} params)"
    header = ["row", "img/s", "ms/step", "peak MiB", "vs row above", "vs official", "first step s"]
    rows, prev, base = [], None, timed["official"][0]
    for k in variants:
        if k not in timed:
            rows.append([k, "skipped (time budget)", *["-"] * 5])
            continue
        t, first = timed[k]
        rows.append([k, f"{args.batch / t:.1f}", f"{t * 1e3:.1f}", peak[k], f"{prev / t:.2f}x" if prev else "-",
                     f"{base / t:.2f}x", f"{first:.1f}"])
        prev = t
    print(f"{machine}\n{desc}, batch {args.batch}, precond {args.precond}, backend {ops.select_backend(device)}")
    print_table(header, rows)
    notes = [f"Machine: {machine}",
             f"Command: `python benchmarks/train_throughput.py {' '.join(argv or sys.argv[1:])}`",
             f"{desc}, batch {args.batch}; rows add one change each (see the script's header); {info['rounds']} "
             f"interleaved timed steps per row after {args.warmup} warm-up; peak memory: one extra step per row"]
    if args.results:
        append_results("train_throughput", header, rows, notes, path=args.results)
        print(f"appended {len(rows)} rows to {args.results}")
    if args.json:
        write_json(args.json, dict(machine=machine, network=desc, batch=args.batch,
                                   rows=[dict(zip(header, r)) for r in rows]))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
