"""Training images/s for the same network and batch, in one run:

  official   the official code's step: eager float32, op-by-op loss with stored torch.randn noise,
             TF32 off, for-loop Adam
  fdm_fast   the step ``python -m fdm_fast.train`` runs (train.setup + train.train_step: batch from the
             dataset, fused perturb + fused loss, bf16 autocast, torch.compile of the network, Adam,
             EMA; on a GPU channels_last, fused Adam, the dataset in GPU memory), on the digits
             (CPU preset) or a synthetic dataset of the preset's size

Steps alternate between the two (interleaved, so a slow phase of a shared machine hits both), the
first steps (compilation, allocation) are reported apart. Defaults: on a GPU 64x64 DDPM++ (channel
mults 1,2,2,2) at batch 64; on a CPU the small digits network (16x16x1) at batch 64.

    python benchmarks/train_throughput.py                 # prints the table; writes nothing
    python benchmarks/train_throughput.py --results       # also appends the rows to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import add_results_arg, append_results, machine_name, print_table, time_interleaved  # noqa: E402

from fdm_fast import ops, train  # noqa: E402
from fdm_fast.nn import build_denoiser, count_parameters  # noqa: E402


def config_for(device: torch.device, args) -> dict:
    if args.preset == "ffhq64" or (args.preset == "auto" and device.type == "cuda"):
        return dict(precond=args.precond, arch="ddpmpp", img_resolution=64, img_channels=3,
                    network=dict(channel_mult=(1, 2, 2, 2), dropout=0.05))
    return dict(precond=args.precond, arch="ddpmpp", img_resolution=16, img_channels=1,
                network=dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,),
                             dropout=0.0))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="auto", choices=["auto", "ffhq64", "digits"],
                    help="network: ffhq64 (64x64 DDPM++) or digits (small); auto = ffhq64 on GPU, digits on CPU")
    ap.add_argument("--precond", default="fdm_edm")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 30 GPU, 15 CPU)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant after the first")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile fdm_fast's network (default: on; its compile time is reported apart)")
    ap.add_argument("--json", type=Path)
    add_results_arg(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (30 if cuda else 15)
    compile_net = args.compile if args.compile is not None else True  # fastest valid settings, CPU too
    ops.set_value_checks(False)
    cfg = config_for(device, args)
    torch.manual_seed(0)
    shape = (args.batch, cfg["img_channels"], cfg["img_resolution"], cfg["img_resolution"])
    y = (torch.rand(shape, device=device) * 2 - 1)

    # --- official-style step
    net_o = build_denoiser(cfg).to(device).train()
    opt_o = torch.optim.Adam(net_o.parameters(), lr=1e-4, foreach=False, fused=False)
    p = net_o.precond

    def official():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        sigma = p.sample_sigma(args.batch, device=device).reshape(-1, 1, 1, 1)
        n = torch.randn_like(y) * sigma
        D = net_o(y + n, sigma)
        w = torch.clamp(p.loss_weight(sigma), max=50.0)
        loss = w * ((D - y) ** 2)
        loss.sum().mul(1 / args.batch).backward()
        for q in net_o.parameters():
            if q.grad is not None:
                torch.nan_to_num(q.grad, nan=0, posinf=1e5, neginf=-1e5, out=q.grad)
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)

    # --- fdm_fast step: the step python -m fdm_fast.train runs (train.setup + train.train_step: data
    # slice, loss on the fused ops, backward, optimizer, EMA), on a synthetic dataset of the same size
    tmp = tempfile.mkdtemp(prefix="fdm_fast_bench_")
    ds = ["--ds", "digits"] if cfg["img_resolution"] == 16 and cfg["img_channels"] == 1 else \
        ["--ds", "synthetic", "--resolution", str(cfg["img_resolution"])]
    o = train.resolve(train.parse_args([*ds, "--precond", args.precond, "--batch", str(args.batch), "--precision",
                                        "bf16", "--compile" if compile_net else "--no-compile", "--kimg", "1e6",
                                        "--outdir", tmp, "--augment", "0", "--warmup-ite", "400"]))
    o.network = {k: v for k, v in cfg["network"].items() if k not in ("channel_mult", "dropout")}
    o.channel_mult, o.dropout = cfg["network"]["channel_mult"], cfg["network"]["dropout"]
    run = train.setup(o, device=device)
    ops.set_value_checks(False)  # (setup turns them on for the CPU; the official side has none either)
    net_f = run.net

    def fused():
        torch.backends.cuda.matmul.allow_tf32 = True  # official() turns TF32 off before each of its steps
        torch.backends.cudnn.allow_tf32 = True
        train.train_step(run)

    variants = {"official": official, "fdm_fast": fused}
    timed = time_interleaved(variants, device, reps=steps, warmup=args.warmup)
    med = {k: v[0] for k, v in timed.items()}
    first = {k: v[1] for k, v in timed.items()}
    machine = machine_name(device)
    params = count_parameters(net_o.model)
    desc = f"{cfg['img_resolution']}x{cfg['img_resolution']}x{cfg['img_channels']} DDPM++ ({params:,} params)"
    header = ["variant", "network", "batch", "median step ms", "img/s", "vs official", "first step s"]
    rows = []
    for k in variants:
        rows.append([k, desc, str(args.batch), f"{med[k] * 1e3:.1f}", f"{args.batch / med[k]:.1f}",
                     f"{med['official'] / med[k]:.2f}x", f"{first[k]:.1f}"])
    print(machine)
    print(f"fdm_fast: fused ops ({ops.select_backend(device)}), bf16 autocast, compile={compile_net}, "
          f"channels_last={cuda}, fused Adam={cuda}")
    print_table(header, rows)
    notes = [f"Machine: {machine}", f"Command: `python benchmarks/train_throughput.py {' '.join(argv or sys.argv[1:])}`",
             f"official: eager fp32, op-by-op loss, TF32 off, for-loop Adam, no EMA; fdm_fast: train.train_step "
             f"(data slice, fused ops ({ops.select_backend(device)}), bf16 autocast, compile={compile_net}, "
             f"channels_last={cuda}, fused Adam={cuda}, EMA); {steps} interleaved timed steps each after "
             f"{args.warmup} warm-up"]
    if args.results:
        append_results("train_throughput", header, rows, notes, path=args.results)
        print(f"appended {len(rows)} rows to {args.results}")
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine, rows=[dict(zip(header, r)) for r in rows]), indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
