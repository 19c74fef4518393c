"""Networks, the training step, and the training loop (digits, on the CPU)."""

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_group
from fdm_fast import schedules
from fdm_fast.loss import fdm_clamp, noise_rng, sample_uniforms, training_loss, training_loss_composite
from fdm_fast.nn import build_denoiser, count_parameters, song_unet
from fdm_fast.data.order import GlobalOrder
from fdm_fast.train import load_snapshot, parse_args, resolve, training_loop

TINY = ["--ds", "digits", "--resolution", "8", "--batch", "32", "--precision", "fp32", "--grid", "4",
        "--grid-steps", "3", "--no-compile"]


def tiny_options(tmp_path, *extra):
    o = resolve(parse_args([*TINY, "--outdir", str(tmp_path), *extra]))
    o.network = dict(model_channels=16, num_blocks=1, attn_resolutions=(4,))
    o.channel_mult = (1, 2)
    return o


# ------------------------------------------------------------------------------------------------
# Networks.


def test_parameter_counts_match_edm():
    assert count_parameters(song_unet("ddpmpp", 32, channel_mult=(2, 2, 2))) == 55_732_739
    assert count_parameters(song_unet("ddpmpp", 64, channel_mult=(1, 2, 2, 2))) == 61_804_419


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
@pytest.mark.parametrize("res", [32, 64])
def test_shapes_with_labels(arch, res):
    net = song_unet(arch, res, 3, label_dim=10, augment_dim=9, model_channels=32,
                    channel_mult=(1, 2, 2) if res == 32 else (1, 2, 2, 2), num_blocks=1).eval()
    x = torch.randn(2, 3, res, res)
    labels = torch.eye(10)[[1, 7]]
    out = net(x, torch.tensor([0.1, -0.3]), labels, torch.zeros(2, 9))
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="class_labels"):
        net(x, torch.tensor([0.1, -0.3]))


def test_state_dict_names_follow_edm():
    keys = set(song_unet("ddpmpp", 32, channel_mult=(2, 2, 2)).state_dict())
    for k in ["map_layer0.weight", "enc.32x32_conv.weight", "enc.32x32_block0.norm0.weight",
              "enc.16x16_down.conv0.resample_filter", "enc.16x16_block0.qkv.weight", "dec.8x8_in0.proj.weight",
              "dec.32x32_aux_conv.weight", "dec.32x32_block4.skip.weight"]:
        assert k in keys, k


def test_attention_math_runs_in_float32_under_bf16_autocast(monkeypatch):
    """EDM's AttentionOp is float32; autocast would cast SDPA's inputs back to bf16 unless switched off."""
    import torch.nn.functional as nnf

    seen = []
    real = nnf.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(nnf, "scaled_dot_product_attention", spy)
    net = song_unet("ddpmpp", 8, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 1, 8, 8), torch.tensor([0.1, -0.3]))
    assert seen and all(dt == torch.float32 and not on for dt, on in seen), seen
    assert torch.isfinite(out.float()).all()


# ------------------------------------------------------------------------------------------------
# The training step.


@pytest.mark.parametrize("name", ["fdm_edm", "fdm_vp", "ve"])
def test_fused_step_equals_eager_composite(name):
    torch.manual_seed(0)
    d = build_denoiser(dict(precond=name, arch="ddpmpp", img_resolution=8, img_channels=1,
                            network=dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                                         dropout=0.0)))
    y = torch.rand(6, 1, 8, 8) * 2 - 1
    keys = torch.arange(6) + 100
    sigma = d.precond.sigma_from_uniform(sample_uniforms(3, keys)[:, 0]).float()
    seed, offset = noise_rng(3, keys, 64, "cpu")
    clamp = fdm_clamp(d, 10, 200)
    assert (clamp is None) == (not d.precond.fdm)
    results = []
    for fn in (training_loss, training_loss_composite):
        d.zero_grad()
        loss = fn(d, y, sigma, seed=seed, offset=offset, clamp=clamp)
        loss.sum().backward()
        results.append((loss.detach(), [p.grad.clone() for p in d.parameters()]))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * (b.abs().max().item() + 1e-6))


def test_warmup_clamp_per_step_equals_formula():
    d = build_denoiser(dict(precond="fdm_edm", arch="ddpmpp", img_resolution=8, img_channels=1,
                            network=dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=())))
    for step in [0, 1, 50, 199, 399, 400, 1000]:
        want = 5 * 100 ** (step / 400)
        got = fdm_clamp(d, step, 400)
        assert (got is None) if want >= 500 else got == pytest.approx(want, rel=1e-12)
    assert fdm_clamp(build_denoiser(dict(d.config, precond="edm")), 5, 400) is None  # base preconds: no warm-up


def test_sample_keys_are_pure_functions_of_the_global_index():
    u = sample_uniforms(7, torch.arange(10))
    assert torch.equal(u[3:5], sample_uniforms(7, torch.tensor([3, 4])))
    assert ((u > 0) & (u < 1)).all() and not torch.equal(u, sample_uniforms(8, torch.arange(10)))
    # sigma_from_uniform reproduces each training distribution
    big = sample_uniforms(1, torch.arange(100_000))[:, 0]
    s = schedules.get_precond("edm").sigma_from_uniform(big).log()
    assert s.mean().item() == pytest.approx(-1.2, abs=0.02) and s.std().item() == pytest.approx(1.2, abs=0.02)


def test_global_order_is_epochs_of_permutations_and_slices_freely():
    order = GlobalOrder(37, seed=5)
    seq = order.indices(0, 37 * 3 + 5)
    for e in range(3):
        assert sorted(seq[37 * e:37 * (e + 1)].tolist()) == list(range(37)), "an epoch covers every image once"
    assert not np.array_equal(seq[:37], seq[37:74]), "each epoch has its own permutation"
    # any slicing of the positions (ranks, rounds, resume) reads the same sequence
    parts = [GlobalOrder(37, seed=5).indices(a, b - a) for a, b in ((0, 13), (13, 50), (50, 116))]
    assert np.array_equal(np.concatenate(parts), seq)


# ------------------------------------------------------------------------------------------------
# The loop.


def test_loss_falls_on_digits(tmp_path):
    o = tiny_options(tmp_path, "--kimg", "6.4", "--tick", "0.32", "--lr", "3e-3")
    training_loop(o, quiet=True)
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    first = sum(s["loss"] for s in stats[:4]) / 4
    last = sum(s["loss"] for s in stats[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    assert (tmp_path / "options.json").exists() and list(tmp_path.glob("samples-*.png"))
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # loss and speed vs kimg


@pytest.mark.parametrize("augment", ["0", "0.5"])
def test_resume_is_exact(tmp_path, augment):
    """N steps + resume + N steps equals 2N steps, bitwise (CPU), with and without augmentation."""
    a, b = tmp_path / "a", tmp_path / "b"
    opts = ("--kimg", "100", "--dropout", "0.1", "--augment", augment)
    full = training_loop(tiny_options(a, *opts), quiet=True, stop_after_steps=8)
    training_loop(tiny_options(b, *opts), quiet=True, stop_after_steps=4)
    resumed = training_loop(tiny_options(b, *opts, "--resume", "auto"), quiet=True, stop_after_steps=4)
    assert resumed["step"] == full["step"] == 8
    for (k, p), q in zip(full["net"].state_dict().items(), resumed["net"].state_dict().values()):
        assert torch.equal(p, q), k
    for p, q in zip(full["ema"].state_dict().values(), resumed["ema"].state_dict().values()):
        assert torch.equal(p, q)


def test_resume_with_another_batch_continues_with_new_samples(tmp_path, monkeypatch):
    """A sample's position keys its image, sigma, flip, augmentation and noise: a run resumed with another
    --batch must go on from the images it has seen, not from step x the new batch (which trained again
    on exactly the samples, noise included, of earlier steps)."""
    import fdm_fast.train as train
    from fdm_fast.train import setup

    keys, real = [], train.sample_uniforms
    monkeypatch.setattr(train, "sample_uniforms", lambda seed, k, n: keys.append(k.clone()) or real(seed, k, n))
    training_loop(tiny_options(tmp_path, "--kimg", "100"), quiet=True, stop_after_steps=4)  # batch 32
    said = []
    setup(tiny_options(tmp_path, "--kimg", "100", "--batch", "16", "--resume", "auto"), log=said.append)
    assert any("the checkpoint was trained with --batch 32" in m for m in said)
    res = training_loop(tiny_options(tmp_path, "--kimg", "100", "--batch", "16", "--resume", "auto"), quiet=True,
                        stop_after_steps=4)
    assert (res["step"], res["cur_nimg"]) == (8, 4 * 32 + 4 * 16)
    assert torch.equal(torch.cat(keys), torch.arange(4 * 32 + 4 * 16))  # every position once, in order


def test_transfer_starts_from_a_snapshot_and_a_checkpoint_wins(tmp_path):
    from conftest import tiny_snapshot
    from fdm_fast.train import setup

    snap = tiny_snapshot(tmp_path / "snap.pt")  # the tiny run's architecture; weights moved off the init
    data = torch.load(snap, weights_only=True)
    data["config"]["precond"] = "edm"  # another preconditioning: the weights still fit
    data["ema"] = {k: v + 0.25 if v.is_floating_point() else v for k, v in data["ema"].items()}
    torch.save(data, snap)
    said = []
    run = setup(tiny_options(tmp_path / "a", "--kimg", "100", "--transfer", str(snap)), log=said.append)
    for k, v in data["ema"].items():
        assert torch.equal(run.net.state_dict()[k], v) and torch.equal(run.ema.state_dict()[k], v), k
    assert run.step == 0 and any("the EMA of a edm ddpmpp network" in m for m in said)
    trained = training_loop(tiny_options(tmp_path / "a", "--kimg", "100", "--transfer", str(snap)), quiet=True,
                            stop_after_steps=2)
    key = "model.enc.8x8_conv.weight"
    assert not torch.equal(trained["net"].state_dict()[key], data["ema"][key])
    # a resume takes its own checkpoint, not the snapshot
    said.clear()
    run = setup(tiny_options(tmp_path / "a", "--kimg", "100", "--transfer", str(snap), "--resume", "auto"),
                log=said.append)
    assert run.step == 2 and any("not applied" in m for m in said)
    for k, v in trained["net"].state_dict().items():
        assert torch.equal(run.net.state_dict()[k], v), k
    # another architecture: refused, naming the flag, a tensor and the config difference; a missing file
    other = tiny_snapshot(tmp_path / "wide.pt", model_channels=8)
    with pytest.raises(SystemExit) as e:
        setup(tiny_options(tmp_path / "b", "--kimg", "100", "--transfer", str(other)))
    msg = str(e.value)
    assert msg.startswith(f"error: --transfer {other}: its network does not fit") and "model_channels: 8" in msg
    with pytest.raises(SystemExit, match="error: --transfer .*missing.pt"):
        setup(tiny_options(tmp_path / "c", "--kimg", "100", "--transfer", str(tmp_path / "missing.pt")))


def test_transfer_from_an_official_fdm_snapshot(tmp_path):
    """Fine-tuning from the official code's pickle: the run starts from exactly the network generate loads."""
    from fdm_fast.train import setup

    pkl = str(Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official" / "fdm-edm-m2-ddpmpp.pkl")
    if not os.path.isfile(pkl):
        pytest.skip(f"{pkl}: the official fixtures are not here")
    official = load_snapshot(pkl)
    o = resolve(parse_args(["--ds", "synthetic", "--resolution", "8", "--precision", "fp32", "--no-compile",
                            "--kimg", "1", "--outdir", str(tmp_path), "--transfer", pkl]))
    o.network, o.channel_mult = dict(model_channels=16, num_blocks=1, attn_resolutions=(4,)), (1, 2)
    run = setup(o)
    for k, v in official.state_dict().items():
        assert torch.equal(run.net.state_dict()[k], v) and torch.equal(run.ema.state_dict()[k], v), k
    # into the one-channel digits run: refused, naming the one setting that differs (the official config
    # spells out the architecture's defaults, fdm_fast's leaves them out: not a difference)
    with pytest.raises(SystemExit) as e:
        setup(tiny_options(tmp_path / "digits", "--transfer", pkl))
    assert str(e.value).endswith("the configs differ in:\n  img_channels: 3 in the snapshot, 1 in this run")


def test_checkpoints_atomic_keep_k_and_snapshot_loads_weights_only(tmp_path):
    training_loop(tiny_options(tmp_path, "--kimg", "0.64", "--ckpt", "0.064", "--snap", "0.32", "--keep", "2"),
                  quiet=True)
    states = sorted(tmp_path.glob("training-state-*.pt"))
    assert len(states) == 2 and not list(tmp_path.glob("*.tmp*"))
    snaps = sorted(tmp_path.glob("network-snapshot-*.pt"))
    assert snaps
    data = torch.load(snaps[-1], weights_only=True)  # no pickled code
    assert set(data) >= {"config", "ema"}
    d = load_snapshot(str(snaps[-1]))
    assert d.img_resolution == 8 and not d.training
    torch.load(states[-1], weights_only=True)


def test_checkpoints_every_ckpt_minutes_whatever_ckpt_is(tmp_path, monkeypatch):
    import fdm_fast.train as train

    clock = [0.0]  # rank 0's monotonic clock, advanced 7 minutes per training step
    real_step = train.train_step

    def slow_step(run):
        clock[0] += 7 * 60
        return real_step(run)

    monkeypatch.setattr(train.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(train, "train_step", slow_step)
    # --ckpt far beyond the run: only the clock (every 3 steps of 7 minutes, 20 minutes) and the end write
    training_loop(tiny_options(tmp_path / "a", "--kimg", "100", "--ckpt", "50", "--keep", "10",
                               "--ckpt-minutes", "20"), quiet=True, stop_after_steps=7)
    assert [int(p.name[15:23]) for p in sorted((tmp_path / "a").glob("training-state-*.pt"))] == [3, 6, 7]
    training_loop(tiny_options(tmp_path / "b", "--kimg", "100", "--ckpt", "50", "--keep", "10",
                               "--ckpt-minutes", "0"), quiet=True, stop_after_steps=7)
    assert [int(p.name[15:23]) for p in sorted((tmp_path / "b").glob("training-state-*.pt"))] == [7]


def test_missing_dataset_message_and_bad_options(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-m", "fdm_fast.train", "--ds", "ffhq", "--outdir", str(tmp_path),
                        "--kimg", "1"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode != 0
    assert "datasets/ffhq-64x64.zip not found" in r.stderr and "fdm_fast.dataset_tool" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "fdm_fast.train", "--precond", "fdm_edm", "--precision", "fp16",
                        "--dry-run"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "fp16" in r.stderr and "bf16" in r.stderr


def test_precision_auto_is_bf16_only_where_the_device_has_bf16_kernels(monkeypatch):
    """--precision auto (the default) trains in bf16 where bf16 has real kernels and in fp32 elsewhere; an
    explicit choice stands either way."""
    import fdm_fast.train as T

    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(T, "bf16_native", lambda device_type, native=native: native)
        assert resolve(parse_args(["--ds", "digits"])).precision == want
        assert resolve(parse_args(["--ds", "digits", "--precision", "auto"])).precision == want
        for explicit in ("fp32", "bf16"):
            assert resolve(parse_args(["--ds", "digits", "--precision", explicit])).precision == explicit


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.machine() != "x86_64",
                    reason="reads the x86 CPU flags in /proc/cpuinfo")
def test_bf16_is_native_on_a_cpu_with_avx512_and_not_without():
    """oneDNN has bf16 kernels from AVX-512 (avx512_core: F, BW, VL, DQ) on; without them (an AVX2 CPU) a bf16
    convolution runs in fallback code, 62x its fp32 time on a Zen 3 EPYC, so auto must pick fp32 there."""
    from fdm_fast.train import bf16_native

    flags = {f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()[2:]}
    if "avx_ne_convert" in flags:
        pytest.skip("oneDNN also has bf16 kernels for AVX2 CPUs with AVX-NE-CONVERT and AVX-VNNI-INT8")
    assert bf16_native("cpu") == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags)
    assert bf16_native("cuda") == (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8)


def test_dry_run_refuses_a_batch_the_rounds_cannot_split(capsys):
    from fdm_fast.train import main

    assert main(["--batch", "7", "--batch-gpu", "3", "--dry-run"]) == 2
    assert "--batch-gpu 3 does not divide the per-rank batch 7" in capsys.readouterr().err
    assert main(["--batch", "64", "--batch-gpu", "16", "--dry-run"]) == 0


def test_dry_run_prints_recipe_defaults():
    o = resolve(parse_args(["--ds", "cifar10", "--precond", "fdm_edm"]))
    assert (o.batch, o.lr, o.dropout, o.augment, o.ema, o.lr_rampup, o.warmup_ite) == (512, 1e-3, 0.13, 0.12, 0.5,
                                                                                        10.0, 200)
    o = resolve(parse_args(["--ds", "ffhq", "--precond", "fdm_edm"]))
    assert (o.batch, o.lr, o.dropout, o.augment, o.warmup_ite, tuple(o.channel_mult)) == (256, 2e-4, 0.05, 0.15, 800,
                                                                                          (1, 2, 2, 2))
    o = resolve(parse_args(["--ds", "afhqv2", "--precond", "fdm_vp"]))
    assert (o.dropout, o.warmup_ite) == (0.25, 400)
    assert math.isclose(resolve(parse_args(["--ds", "digits", "--kimg", "3"])).kimg, 3)


def _small_dataset(path, n=37):
    """n random 8x8 grayscale PNGs: a dataset size that no batch or rank count here divides."""
    from PIL import Image

    path.mkdir()
    g = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(g.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(path / f"{i:03d}.png")
    return str(path)


def _torchrun(tmp_path, data, n, name, *flags, steps=10):
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "from fdm_fast.distributed import shutdown_distributed\n"
        "from fdm_fast.train import init_distributed, parse_args, resolve, training_loop\n"
        "out, flags = sys.argv[1], sys.argv[2:]\n"
        f"o = resolve(parse_args(['--ds', {data!r}, '--precision', 'fp32', '--no-compile', '--kimg', '100', "
        "'--dropout', '0.1', '--grid', '4', '--grid-steps', '2', '--outdir', out] + flags))\n"
        "o.network = dict(model_channels=16, num_blocks=1, attn_resolutions=(4,)); o.channel_mult = (1, 2)\n"
        "rank, world, device = init_distributed()\n"
        f"res = training_loop(o, rank=rank, world=world, device=device, quiet=True, stop_after_steps={steps})\n"
        "if rank == 0: torch.save(res['net'].state_dict(), out + '/final.pt')\n"
        "shutdown_distributed()\n")  # as train.main does (a bare destroy can hang at exit on torch 2.6)
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    out = tmp_path / name
    r = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   str(script), str(out), *flags], 600, env=env)  # ~10-40 s each here; 600 s is a hang
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out / "final.pt")


def test_ranks_train_exactly_what_one_process_trains(tmp_path):
    """Over 10 steps = 4.3 epochs of a 37-image dataset (no batch, rank or round count divides it):
    2 gloo ranks (batch 16, 8 per rank) give bitwise the fp32 weights of 1 process accumulating 2
    rounds of 8; 3 ranks with --exact-reduce (batch 24) bitwise those of 1 process with 3 rounds;
    2 ranks x 2 rounds vs 1 process x 4 rounds (a different summation order) agree to float rounding."""
    data = _small_dataset(tmp_path / "data")

    def same(a, b, exact=True):
        for k in a:
            if exact:
                assert torch.equal(a[k], b[k]), k
            else:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)

    one2 = _torchrun(tmp_path, data, 1, "one2", "--batch", "16", "--batch-gpu", "8")
    same(one2, _torchrun(tmp_path, data, 2, "two", "--batch", "16"))
    one3 = _torchrun(tmp_path, data, 1, "one3", "--batch", "24", "--batch-gpu", "8")
    same(one3, _torchrun(tmp_path, data, 3, "three", "--batch", "24", "--exact-reduce"))
    one4 = _torchrun(tmp_path, data, 1, "one4", "--batch", "32", "--batch-gpu", "8")
    same(one4, _torchrun(tmp_path, data, 2, "two_acc", "--batch", "32", "--batch-gpu", "8"), exact=False)


def test_ema_beta_follows_edm():
    """EDM computes the half-life from the images seen before the step: step 0 copies the network."""
    from fdm_fast.train import ema_beta

    for cur in (0, 64, 6400, 10**6, 10**8):
        half = min(0.5e6, cur * 0.05)
        assert ema_beta(0.5, 0.05, 64, cur) == 0.5 ** (64 / max(half, 1e-8))
    assert ema_beta(0.5, 0.05, 64, 0) == 0.0
    assert ema_beta(0.5, None, 64, 0) == 0.5 ** (64 / 0.5e6)


def test_first_step_ema_equals_the_network(tmp_path):
    res = training_loop(tiny_options(tmp_path, "--kimg", "100"), quiet=True, stop_after_steps=1)
    for p, q in zip(res["net"].parameters(), res["ema"].parameters()):
        assert torch.equal(p, q)


def test_cbase_cres_and_adm_from_the_command_line(tmp_path):
    o = resolve(parse_args([*TINY, "--outdir", str(tmp_path), "--cbase", "24", "--cres", "1,2"]))
    assert o.network["model_channels"] == 24 and o.channel_mult == (1, 2)
    for bad in (["--cres", "1,x"], ["--cres", "0,2"], ["--cbase", "0"]):
        with pytest.raises(SystemExit, match="--cres|--cbase"):
            resolve(parse_args([*TINY, *bad]))
    o = resolve(parse_args([*TINY, "--outdir", str(tmp_path / "adm"), "--arch", "adm", "--cbase", "64", "--cres",
                            "1,2", "--kimg", "100", "--snap", "0.016"]))
    o.network = dict(model_channels=64, num_blocks=1, attn_resolutions=(4,))
    res = training_loop(o, quiet=True, stop_after_steps=2)
    assert type(res["net"].model).__name__ == "DhariwalUNet" and res["step"] == 2
    snap = load_snapshot(str(next((tmp_path / "adm").glob("network-snapshot-*.pt"))))
    assert type(snap.model).__name__ == "DhariwalUNet"


def test_einsum_attention_equals_sdpa():
    """The official-style attention option (EDM's einsum AttentionOp) gives the SDPA network's output."""
    torch.manual_seed(0)
    kw = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))
    a = song_unet("ddpmpp", 8, 1, attention="sdpa", **kw).eval()
    for q in a.parameters():
        q.data.add_(torch.randn_like(q) * 0.05)  # away from the zero-initialised projections
    b = song_unet("ddpmpp", 8, 1, attention="einsum", **kw).eval()
    b.load_state_dict(a.state_dict())
    x, c = torch.randn(3, 1, 8, 8), torch.tensor([0.1, -0.4, 1.0])
    torch.testing.assert_close(a(x, c), b(x, c), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_impl"):
        song_unet("ddpmpp", 8, 1, attention="flash", **kw)


# ------------------------------------------------------------------------------------------------
# Evaluation during training (--metric).


def test_evaluation_during_training_changes_nothing_and_is_logged(tmp_path):
    """--metric evaluates the EMA network every --metric-every kimg; the weights after 6 steps are
    bitwise those of a run without it (dropout and augmentation on, so any use of torch's generator
    would show), and each evaluation is a stats.jsonl record, drawn in metrics.png."""
    opts = ("--resolution", "16", "--kimg", "100", "--dropout", "0.1", "--augment", "0.5")
    plain = training_loop(tiny_options(tmp_path / "a", *opts), quiet=True, stop_after_steps=6)
    evald = training_loop(tiny_options(tmp_path / "b", *opts, "--metric", "digits-fd", "--metric-every", "0.064",
                                       "--metric-num", "16", "--metric-steps", "2"), quiet=True, stop_after_steps=6)
    for (k, p), q in zip(plain["net"].state_dict().items(), evald["net"].state_dict().values()):
        assert torch.equal(p, q), k
    for p, q in zip(plain["ema"].state_dict().values(), evald["ema"].state_dict().values()):
        assert torch.equal(p, q)
    recs = [json.loads(line) for line in (tmp_path / "b" / "stats.jsonl").read_text().splitlines()]
    metric = [r for r in recs if "metric" in r]
    assert [round(r["kimg"], 3) for r in metric] == [0.064, 0.128, 0.192]  # batch 32: every 2 steps
    for r in metric:
        assert r["metric"] == "digits-fd" and r["nfe"] == 3 and r["num"] == 16
        assert math.isfinite(r["fd"]) and r["fd"] > 0
        assert 0 <= r["precision"] <= 1 and 1 <= r["classes_seen"] <= 10
    assert all("loss" in r for r in recs if "metric" not in r)
    assert (tmp_path / "b" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "a" / "metrics.png").exists()


@pytest.mark.parametrize("flags, message", [
    (["--resolution", "8", "--metric", "digits-fd"], r"--metric digits-fd: scores 16x16 grayscale digits .* 8x8x1"),
    (["--metric", "fid"], r"--metric fid: needs --ref"),
    (["--metric", "digits-fd", "--metric-num", "1"], r"--metric-num: expected at least 2 samples, got 1"),
])
def test_metric_refused_before_training(tmp_path, capsys, flags, message):
    import re

    from fdm_fast.train import main

    rc = main(["--ds", "digits", "--kimg", "1", "--outdir", str(tmp_path), "--no-compile", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err
    assert not list(tmp_path.glob("training-state-*.pt"))  # nothing trained


def test_metric_fid_without_inception_weights_refused_before_training(tmp_path, capsys, monkeypatch):
    from fdm_fast.train import main

    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(4), sigma=np.eye(4))
    monkeypatch.delenv("FDM_FAST_INCEPTION", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # no cached weights either
    rc = main(["--ds", "digits", "--kimg", "1", "--outdir", str(tmp_path / "run"), "--no-compile",
               "--metric", "fid", "--ref", str(ref)])
    err = capsys.readouterr().err
    assert rc == 2 and "--metric fid: FID needs the Inception-v3 weights" in err, err
    assert not list((tmp_path / "run").glob("training-state-*.pt"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    rc = main(["--ds", "digits", "--kimg", "1", "--outdir", str(tmp_path / "run"), "--no-compile",
               "--metric", "fid", "--ref", str(bad)])
    assert rc == 2 and f"--ref {bad}: not reference statistics" in capsys.readouterr().err
