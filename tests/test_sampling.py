"""Samplers on the fused step ops against a float64 eager EDM sampler (docs/design.md 1.3), on the analytic
Gaussian-mixture denoiser; per-seed invariance; moments at high NFE."""

import math

import numpy as np
import pytest
import torch

from conftest import CUDA_ON_CPU, HAS_CPU_EXT, run_group, tiny_snapshot
from fdm_fast import ops, schedules, solvers
from fdm_fast.gmm import GaussianMixtureDenoiser
from fdm_fast.sampling import edm_sampler, seed_labels

BACKENDS = ["torch"] + (["cpu"] if HAS_CPU_EXT else [])


def reference_steps(p, num_steps, sigma_min, sigma_max, rho):
    """EDM's sigma steps (docs/design.md 1.3) in float64, clipped to the preconditioning's range, then 0."""
    sigma_min, sigma_max = max(sigma_min, p.sigma_min), min(sigma_max, p.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def reference_sampler(gmm, seeds, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0, S_min=0.0,
                      S_max=float("inf"), S_noise=1.0):
    """EDM's sampler written from docs/design.md 1.3 in float64, eager, with the contract's noise."""
    t = reference_steps(gmm.precond, num_steps, sigma_min, sigma_max, rho)
    seeds = torch.as_tensor(seeds)
    shape = (len(seeds), *gmm.shape)
    stride = (math.prod(gmm.shape) + 3) // 4
    noise = lambda k: ops.randn(shape, seed=seeds, offset=k * stride, backend="torch").double()  # noqa: E731
    x = noise(0) * t[0]
    for n, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur * (1 + gamma)
        x_hat = x + (t_hat**2 - t_cur**2).sqrt() * S_noise * noise(n + 1) if gamma > 0 else x
        d = (x_hat - gmm.denoise(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if n < num_steps - 1:
            d2 = (x - gmm.denoise(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", schedules.PRECONDS)
@pytest.mark.parametrize("churn", [0.0, 30.0])
def test_fused_heun_matches_float64_eager(backend, name, churn):
    gmm = GaussianMixtureDenoiser.random(k=5, shape=(1, 3, 3), seed=2, precond=name)
    seeds = list(range(7))
    kw = dict(num_steps=18, S_churn=churn, S_min=0.01, S_max=50.0, S_noise=1.003)
    got = edm_sampler(gmm, seeds, device="cpu", backend=backend, **kw)
    want = reference_sampler(gmm, seeds, **kw)
    assert got.dtype == torch.float32
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-4, err


def test_per_seed_invariance():
    gmm = GaussianMixtureDenoiser.random(k=3, shape=(1, 4, 4), seed=1, precond="fdm_edm")
    both = edm_sampler(gmm, [3, 7], num_steps=10, S_churn=20, device="cpu")
    alone = edm_sampler(gmm, [7], num_steps=10, S_churn=20, device="cpu")
    assert torch.equal(both[1], alone[0])
    assert not torch.equal(both[0], both[1])


def test_seed_labels_follow_the_one_convention():
    """generate, fid, the training grid and the in-training metric all give seed s the class s % label_dim."""
    got = seed_labels([0, 3, 10, 13, 27], 10)
    assert got.dtype == torch.float32 and got.shape == (5, 10) and got.sum(1).eq(1).all()
    assert got.argmax(1).tolist() == [0, 3, 0, 3, 7]
    assert seed_labels(torch.tensor([4, 5]), 3, class_idx=2).argmax(1).tolist() == [2, 2]  # generate --class
    assert seed_labels([1, 2], 0) is None


@pytest.mark.parametrize("sampler", ["edm_sampler", "solvers.sample"])
def test_samplers_name_bad_seeds_and_labels(tmp_path, sampler):
    """Seeds that are not integers were truncated (0.5 -> 0) and labels of the wrong shape failed deep in the
    network (a matmul's shapes): both samplers now refuse them up front, naming the argument."""
    import warnings

    from fdm_fast.snapshots import load_snapshot

    run = edm_sampler if sampler == "edm_sampler" else solvers.sample
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no checksum file beside these test snapshots
        cond = load_snapshot(str(tiny_snapshot(tmp_path / "cond.pt", label_dim=10, attn=False)), "cpu")
        uncond = load_snapshot(str(tiny_snapshot(tmp_path / "uncond.pt", attn=False)), "cpu")
    rows = [
        (uncond, [], None, "seeds: expected at least one seed, got none"),
        (uncond, [0.5, 1.5], None, "seeds: expected integers, got torch.float32"),
        (uncond, [0, 1], torch.ones(2, 10), "class_labels: this network is unconditional (label_dim 0); pass None"),
        (cond, [0, 1], torch.ones(3, 10), "class_labels: expected a float tensor [2, 10] (one one-hot row per seed; "
                                          "sampling.seed_labels makes them), got torch.float32 [3, 10]"),
        (cond, [0, 1], torch.tensor([1, 2]), "got torch.int64 [2]"),
        (cond, [0, 1], [1, 2], "got list"),
    ]
    kw = {"num_steps": 2} if run is edm_sampler else {"steps": 2}
    for net, seeds, labels, message in rows:
        with pytest.raises(ValueError) as e:
            run(net, seeds, class_labels=labels, **kw)
        assert message in str(e.value), (seeds, labels, str(e.value))
    # what they take: integer seeds of any kind, one-hot labels, or none on a conditional network (zeros)
    assert run(uncond, range(2), **kw).shape == (2, 1, 8, 8)
    assert run(uncond, np.array([3, 4]), **kw).shape == (2, 1, 8, 8)
    assert run(cond, [0, 1], class_labels=seed_labels([0, 1], 10), **kw).shape == (2, 1, 8, 8)
    assert run(cond, [0, 1], **kw).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("name", ["edm", "fdm_edm", "fdm_vp"])
def test_samples_match_mixture_moments_at_high_nfe(name):
    gmm = GaussianMixtureDenoiser.random(k=3, shape=(2, 1, 1), seed=4, precond=name, spread=1.5)
    x = edm_sampler(gmm, list(range(4000)), num_steps=64, device="cpu").double().reshape(4000, -1)
    m, cov = gmm.moments()
    assert (x.mean(0) - m).abs().max().item() < 0.08
    assert (torch.cov(x.T) - cov).abs().max().item() < 0.15 * cov.abs().max().item()


def test_generate_cli_same_images_for_any_batching(tmp_path):
    import numpy as np
    from PIL import Image

    from fdm_fast.generate import main, parse_seeds

    snap = tiny_snapshot(tmp_path / "snap.pt")
    for b in (2, 5):
        assert main(["--network", str(snap), "--seeds", "0-4", "--steps", "4", "--batch", str(b),
                     "--outdir", str(tmp_path / f"b{b}"), "--S-churn", "5"]) == 0
    for s in range(5):
        a = np.asarray(Image.open(tmp_path / f"b2/000000/{s:06d}.png"))
        b = np.asarray(Image.open(tmp_path / f"b5/000000/{s:06d}.png"))
        assert np.array_equal(a, b)
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    assert main(["--network", str(tmp_path / "missing.pt"), "--grid", "x.png"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(bool(CUDA_ON_CPU), reason="its ranks are fresh processes: they load the real fdm_fast._C, not "
                                              "the test build tests/test_cuda_on_cpu.py runs this file for")
def test_generate_on_two_ranks_writes_what_one_process_writes(tmp_path):
    """torchrun with 2 gloo ranks, 7 seeds (rank 0 draws 4, rank 1 draws 3) in batches of 2: every PNG
    and the gathered grid are bitwise those of one process, and both ranks exit (no hang at shutdown,
    none after an error that every rank reports); --skip-existing on 2 ranks fills in what is missing."""
    import os
    import shutil
    import sys

    snap = tiny_snapshot(tmp_path / "snap.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))

    def run(ranks, name, *extra, grid=True):
        launch = [sys.executable] if ranks == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        cmd = [*launch, "-m", "fdm_fast.generate", "--network", str(snap), "--seeds", "0-6", "--steps", "3",
               "--batch", "2", "--S-churn", "5", "--outdir", str(tmp_path / name),
               *(["--grid", str(tmp_path / f"{name}.png")] if grid else []), *extra]
        return run_group(cmd, 300, env=env)

    one, two = run(1, "one"), run(2, "two")
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert len(files) == 7
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
    # a 2-rank run cut short: seeds 1 and 5 (rank 1) and 4 (rank 0) missing; --skip-existing draws only those
    shutil.copytree(tmp_path / "one", tmp_path / "cut")
    for s in (1, 4, 5):
        (tmp_path / f"cut/000000/{s:06d}.png").unlink()
    cut = run(2, "cut", "--skip-existing", grid=False)
    assert cut.returncode == 0, cut.stderr[-2000:]
    assert "generated 3 images" in cut.stdout and "skipped 4 seeds" in cut.stdout, cut.stdout
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes(), f
    bad = run(2, "bad", "--class", "3")  # an unconditional network: each rank says so and returns 2
    assert bad.returncode != 0 and "--class: this network is unconditional" in bad.stderr


def test_generate_samples_with_the_solver_it_names(tmp_path, capsys):
    """The default, --solver heun and the old --sampler heun run EDM's Heun (NFE 2N - 1); --solver euler
    runs Euler: each equal to edm_sampler called directly. (generate once ran Euler for all but the old
    --sampler heun, while printing Heun's NFE.)"""
    import numpy as np
    from PIL import Image

    from fdm_fast.generate import main
    from fdm_fast.snapshots import load_snapshot

    snap = tiny_snapshot(tmp_path / "snap.pt")
    net = load_snapshot(str(snap), "cpu")
    want = {}
    for heun in (True, False):
        x = edm_sampler(net, [0, 1, 2], num_steps=4, heun=heun, device="cpu")
        want[heun] = (x.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)[:, 0].numpy().astype(int)
    assert np.abs(want[True] - want[False]).max() > 8  # the two solvers are told apart
    for extra, heun, nfe in [([], True, 7), (["--solver", "heun"], True, 7), (["--sampler", "heun"], True, 7),
                             (["--solver", "euler"], False, 4), (["--sampler", "euler"], False, 4)]:
        out = tmp_path / ("-".join(extra) or "default")
        assert main(["--network", str(snap), "--seeds", "0-2", "--steps", "4", "--outdir", str(out), *extra]) == 0
        assert f"NFE {nfe})" in capsys.readouterr().out, extra
        for s in range(3):
            got = np.asarray(Image.open(out / f"000000/{s:06d}.png")).astype(int)
            assert np.abs(got - want[heun][s]).max() <= 1, (extra, s)


def reference_dpmpp_2m(gmm, seeds, num_steps):
    """DPM-Solver++(2M) written independently, in float64 (k-diffusion's form in sigma)."""
    p = gmm.precond
    smin, smax, rho = max(0.002, p.sigma_min), min(80.0, p.sigma_max), 7.0
    i = torch.arange(num_steps, dtype=torch.float64)
    sig = (smax ** (1 / rho) + i / (num_steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    sig = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
    x = ops.randn((len(seeds), *gmm.shape), seed=torch.as_tensor(seeds), backend="torch").double() * sig[0]
    old = None
    for k in range(num_steps):
        den = gmm.denoise(x, sig[k])
        if sig[k + 1] == 0:
            return den
        t, tn = -sig[k].log(), -sig[k + 1].log()
        h = tn - t
        if old is not None:
            r = (t - (-sig[k - 1].log())) / h
            den_d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
        else:
            den_d = den
        x = (sig[k + 1] / sig[k]) * x - torch.expm1(-h) * den_d
        old = den
    return x


@pytest.mark.parametrize("name", schedules.PRECONDS)
def test_dpm_solver_pp_2m_matches_independent_implementation(name):
    from fdm_fast.sampling import dpm_solver_pp_2m

    gmm = GaussianMixtureDenoiser.random(k=4, shape=(1, 3, 3), seed=5, precond=name)
    got = dpm_solver_pp_2m(gmm, list(range(6)), num_steps=15, device="cpu")
    want = reference_dpmpp_2m(gmm, list(range(6)), 15)
    assert (got.double() - want).abs().max().item() <= 1e-4
    # and it converges to the same solution as Heun at high NFE
    heun = edm_sampler(gmm, list(range(6)), num_steps=200, device="cpu").double()
    fine = dpm_solver_pp_2m(gmm, list(range(6)), num_steps=400, device="cpu").double()
    assert (fine - heun).abs().max().item() < 5e-3


def _graph_cfg(label_dim):
    """The network of the CUDA-graph tests (and of the CPU check of their premise)."""
    return dict(precond="fdm_edm", arch="ddpmpp", img_resolution=16, img_channels=3, label_dim=label_dim,
                network=dict(model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,)))


def _live(net):
    """The network with random weights of unit gain everywhere and its label embedding amplified. EDM's
    initialisation scales the blocks' last convolutions by 1e-5, so at init other labels (or guidance)
    change a 6-step sample by less than 1e-5: a CUDA graph that replayed stale labels would still match
    its eager run at the tests' 1e-5. Here they move a sample by about 3e-3 on average (the test below)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in) * (1 if p.dim() > 1 else 0.1))
            if "map_label" in name:
                p.mul_(10)
    return net


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")
@pytest.mark.parametrize("sampler, kw", [
    ("edm_sampler", dict()),                          # deterministic Heun: generate's default
    ("edm_sampler", dict(S_churn=10)),                # stochastic Heun
    ("edm_sampler", dict(heun=False)),                # Euler
    ("edm_sampler", dict(heun=False, S_churn=10)),    # Euler with churn
    ("dpm_solver_pp_2m", dict()),
    ("ipndm", dict()),
])
@pytest.mark.parametrize("label_dim", [0, 10])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_sampling_equals_eager(sampler, kw, label_dim, backend):
    if backend not in ops.available_backends("cuda"):
        pytest.skip(f"backend {backend} is not available on this machine")
    kw = dict(kw, backend=backend)
    from fdm_fast import sampling
    from fdm_fast.nn import build_denoiser
    from fdm_fast.sampling import GraphedSampler

    cfg = _graph_cfg(label_dim)
    torch.manual_seed(0)
    net = _live(build_denoiser(cfg)).cuda().eval().requires_grad_(False)
    fn = getattr(sampling, sampler)
    graphed = GraphedSampler(net, batch=8, sampler=fn, num_steps=6, **kw)
    for k, seeds in enumerate((range(8), range(100, 108))):
        labels = torch.eye(10, device="cuda")[[(s + k) % 10 for s in seeds]] if label_dim else None
        want = fn(net, list(seeds), num_steps=6, class_labels=labels, **kw)
        torch.testing.assert_close(graphed(list(seeds), labels), want, rtol=1e-5, atol=1e-5)


def test_the_graph_tests_network_makes_labels_and_guidance_matter():
    """The premise of the CUDA-graph tests (run here on the CPU): with _live's weights, other labels or
    guidance move a sample by far more than those tests' 1e-5 tolerance; with EDM's init they do not."""
    from fdm_fast.nn import build_denoiser

    cfg = _graph_cfg(10)
    la, lb = torch.eye(10)[[s % 10 for s in range(8)]], torch.eye(10)[[(s + 1) % 10 for s in range(8)]]
    for live in (False, True):
        net = (_live(build_denoiser(cfg)) if live else build_denoiser(cfg)).eval().requires_grad_(False)
        a = solvers.sample(net, range(8), class_labels=la, solver="heun", steps=6)
        b = solvers.sample(net, range(8), class_labels=lb, solver="heun", steps=6)
        g = solvers.sample(net, range(8), class_labels=la, solver="heun", steps=6, guidance=2.0)
        for other in (b, g):
            d = (a - other).abs()
            assert d.mean() > 1e-3 if live else d.max() < 1e-5, (live, d.mean(), d.max())


def test_graphed_sampler_refuses_bad_seeds_and_labels_before_touching_its_buffers():
    """GraphedSampler.__call__'s checks, on the CPU (capture needs a GPU, the checks do not): labels as the
    eager samplers take them (a float [batch, label_dim] tensor; int labels were cast on the copy), the
    captured batch size, and nothing copied into the static buffers before every check has passed."""
    from fdm_fast.sampling import GraphedSampler

    g = object.__new__(GraphedSampler)  # the state __init__ leaves, without a capture
    g.batch, g.seeds, g.labels, g.graph = 4, torch.full((4,), -1), torch.full((4, 10), -1.0), None
    for seeds, labels, message in ((range(4), None, "labels .* for this conditional network"),
                                   (range(4), torch.eye(10, dtype=torch.long)[:4], "a float tensor of shape"),
                                   (range(4), torch.eye(10)[:3], r"shape \(4, 10\)"),
                                   (range(5), torch.eye(10)[:5], "captured for 4 images"),
                                   ([0.5, 1, 2, 3], torch.eye(10)[:4], "integers")):
        with pytest.raises(ValueError, match=message):
            g(seeds, labels)
        assert (g.seeds == -1).all() and (g.labels == -1).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")
@pytest.mark.parametrize("solver", solvers.SOLVERS)
@pytest.mark.parametrize("guided", [False, True])
def test_cuda_graph_solvers_equal_eager(solver, guided):
    # every solver of fdm_fast.solvers (ops.multistep on triton), plain and with classifier-free guidance
    from fdm_fast.nn import build_denoiser
    from fdm_fast.sampling import GraphedSampler

    cfg = _graph_cfg(10)
    torch.manual_seed(0)
    net = _live(build_denoiser(cfg)).cuda().eval().requires_grad_(False)
    kw = dict(solver=solver, steps=6, guidance=2.0 if guided else 1.0)
    graphed = GraphedSampler(net, batch=8, sampler=solvers.sample, **kw)
    for k, seeds in enumerate((range(8), range(100, 108))):
        labels = torch.eye(10, device="cuda")[[(s + k) % 10 for s in seeds]]
        want = solvers.sample(net, list(seeds), class_labels=labels, **kw)
        torch.testing.assert_close(graphed(list(seeds), labels), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="a float tensor"):  # as solvers.sample refuses them
        graphed(list(range(8)), labels.long())


# A device named without its index ("cuda", "cpu:0") is not equal to what a tensor on it reports
# ("cuda:0", "cpu"): samplers and ops compare the two forms only after ops.canonical_device. The GPU
# check found edm_sampler(..., device="cuda") refusing its own seeds; "cpu:0" is the same mismatch here.
SPELLINGS = ["cpu:0", torch.device("cpu", 0)] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("spelled", SPELLINGS, ids=str)
def test_device_named_without_its_index(spelled):
    canonical = ops.canonical_device(spelled)
    assert canonical == torch.empty(0, device=spelled).device
    gmm = GaussianMixtureDenoiser.random(k=3, shape=(1, 4, 4), seed=1, precond="fdm_edm").to(canonical)
    want = edm_sampler(gmm, torch.arange(3), num_steps=6, S_churn=5, device=canonical)
    got = edm_sampler(gmm, torch.arange(3), num_steps=6, S_churn=5, device=spelled)
    assert torch.equal(got.cpu(), want.cpu())
    seeds = torch.arange(3, device=canonical)
    assert torch.equal(ops.randn([3, 5], seed=seeds, device=spelled), ops.randn([3, 5], seed=seeds, device=canonical))
    assert ops.canonical_device("meta") == torch.device("meta")


# ------------------------------------------------------------------------------------------------
# iPNDM (issue 13, first solver): Adams-Bashforth weights derived here, order measured, and the
# sampler against an independent float64 implementation.


def _adams_bashforth(k):
    """Weights w_0..w_{k-1} (newest first) making sum_j w_j p(-j) = integral_0^1 p exact for every
    polynomial p of degree < k: the k-step Adams-Bashforth rule, derived here, not read from the code."""
    A = np.array([[float((-j) ** m) for j in range(k)] for m in range(k)])
    return np.linalg.solve(A, np.array([1.0 / (m + 1) for m in range(k)]))


def test_ipndm_weights_are_adams_bashforth_and_reach_their_order():
    from fdm_fast.sampling import ADAMS_BASHFORTH, ipndm_step

    for k in range(1, 5):
        np.testing.assert_allclose(ADAMS_BASHFORTH[k], _adams_bashforth(k), rtol=0, atol=1e-14)
    # y' = cos(s) on [0, 2] in N equal steps from exact past slopes: the global error falls as h^k
    for k in range(1, 5):
        errs = []
        for N in (20, 40, 80):
            h = 2.0 / N
            y = torch.zeros((), dtype=torch.float64)
            for n in range(N):
                slopes = [torch.tensor(math.cos((n - j) * h), dtype=torch.float64) for j in range(k)]
                y = ipndm_step(y, slopes, n * h, (n + 1) * h)
            errs.append(abs(float(y) - math.sin(2.0)))
        orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
        assert all(abs(o - k) < 0.25 for o in orders), (k, errs, orders)


def reference_ipndm(gmm, seeds, num_steps, max_order, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """iPNDM from its definition in float64: EDM's sigma steps, slopes (x - D) / sigma, the k-step
    Adams-Bashforth rule on the last k slopes, k = min(step + 1, max_order)."""
    t = reference_steps(gmm.precond, num_steps, sigma_min, sigma_max, rho)
    seeds = torch.as_tensor(seeds)
    x = ops.randn((len(seeds), *gmm.shape), seed=seeds, offset=0, backend="torch").double() * t[0]
    history = []
    for n in range(num_steps):
        history.insert(0, (x - gmm.denoise(x, t[n])) / t[n])
        k = min(n + 1, max_order)
        w = _adams_bashforth(k)
        x = x + (t[n + 1] - t[n]) * sum(float(w[j]) * history[j] for j in range(k))
    return x


@pytest.mark.parametrize("name", schedules.PRECONDS)
@pytest.mark.parametrize("max_order", [2, 4])
def test_ipndm_matches_float64_definition(name, max_order):
    from fdm_fast.sampling import ipndm

    gmm = GaussianMixtureDenoiser.random(k=5, shape=(1, 3, 3), seed=2, precond=name)
    seeds = list(range(7))
    got = ipndm(gmm, seeds, num_steps=12, max_order=max_order, device="cpu")
    want = reference_ipndm(gmm, seeds, 12, max_order)
    assert got.dtype == torch.float32
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-4, err
    with pytest.raises(ValueError, match=r"max_order: expected 1, 2, 3 or 4, got 5"):
        ipndm(gmm, seeds, num_steps=4, max_order=5, device="cpu")


def test_generate_skip_existing_continues_a_run_cut_short(tmp_path, monkeypatch, capsys):
    """A run killed while writing its third PNG leaves two complete PNGs and no truncated one (written under
    a temporary name, then renamed); --skip-existing generates only the missing seeds, removes the
    temporary file, and the folder then equals an uninterrupted run's bitwise."""
    from PIL import Image

    from fdm_fast.generate import main
    from fdm_fast.nn import build_denoiser
    from fdm_fast.snapshots import atomic_save

    cfg = dict(precond="fdm_edm", arch="ddpmpp", img_resolution=8, img_channels=1,
               network=dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,)))
    torch.manual_seed(0)
    snap = tmp_path / "snap.pt"
    atomic_save(dict(config=cfg, ema=build_denoiser(cfg).state_dict()), str(snap))
    args = ["--network", str(snap), "--seeds", "0-5", "--steps", "3", "--batch", "4"]
    assert main([*args, "--outdir", str(tmp_path / "full")]) == 0
    real_save, calls = Image.Image.save, []

    def save_then_die(self, fp, *a, **kw):
        calls.append(fp)
        real_save(self, fp, *a, **kw)
        if len(calls) == 3:
            with open(fp, "r+b") as f:
                f.truncate(20)  # half-written
            raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(Image.Image, "save", save_then_die)
    cut = tmp_path / "cut"
    assert main([*args, "--outdir", str(cut)]) == 130  # Ctrl-C's status, and a line instead of a traceback
    monkeypatch.undo()
    assert "the same command with --skip-existing finishes" in capsys.readouterr().err
    assert sorted(p.name for p in (cut / "000000").iterdir() if p.suffix == ".png") == ["000000.png", "000001.png"]
    assert any(".tmp" in p.name for p in (cut / "000000").iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in (cut / "000000").glob("*.png")}
    capsys.readouterr()
    assert main([*args, "--outdir", str(cut), "--skip-existing"]) == 0
    assert "generated 4 images" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (cut / "000000").glob("00000[01].png")} == before  # not rewritten
    assert sorted(p.name for p in (cut / "000000").iterdir()) == [f"{s:06d}.png" for s in range(6)]
    for s in range(6):
        assert (cut / f"000000/{s:06d}.png").read_bytes() == (tmp_path / f"full/000000/{s:06d}.png").read_bytes(), s
    assert main([*args, "--skip-existing", "--grid", str(tmp_path / "g.png"), "--outdir", str(cut)]) == 2
    assert main([*args, "--skip-existing", "--grid", str(tmp_path / "g.png")]) == 2
    assert "--skip-existing: expected --outdir without --grid" in capsys.readouterr().err


def test_generate_outdir_holds_images_of_one_set_of_settings(tmp_path, capsys):
    """A run continued with --skip-existing (or repeated) with other settings would mix two kinds of images
    in one folder, and an FID of that folder would be of neither: generate.json records what made the
    images (network SHA-256 and every sampling option), and a run with other settings is refused before
    it writes anything, naming what differs. The batch size is not a setting (images are
    batch-invariant); a folder without the record (an older version's) takes the run and gets one."""
    import json

    from fdm_fast.generate import main

    snap = tiny_snapshot(tmp_path / "snap.pt")
    other = tiny_snapshot(tmp_path / "other.pt", attn=False)
    out = tmp_path / "out"
    base = ["--network", str(snap), "--seeds", "0-3", "--steps", "2", "--outdir", str(out)]
    assert main(base) == 0
    rec = json.loads((out / "generate.json").read_text())["settings"]
    assert rec["steps"] == 2 and rec["solver"] == "heun" and len(rec["network_sha256"]) == 64
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 4
    capsys.readouterr()
    for extra, message in [(["--steps", "3"], "steps: 2 there, 3 now"),
                           (["--solver", "euler"], "solver: 'heun' there, 'euler' now"),
                           (["--precision", "bf16"], "precision: 'fp32' there, 'bf16' now"),
                           (["--S-churn", "1"], "S_churn: 0.0 there, 1.0 now"),
                           (["--afs", "--steps", "3"], "afs: False there, True now"),
                           (["--network", str(other)], "network_sha256: ")]:
        assert main([*base, "--seeds", "0-5", "--skip-existing", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert f"--outdir {out}: holds images made with other settings (" in err and message in err, (extra, err)
        assert sorted(out.rglob("*.png")) == pngs  # nothing written
    assert main([*base, "--seeds", "0-5", "--skip-existing", "--batch", "5"]) == 0  # the same settings
    assert len(sorted(out.rglob("*.png"))) == 6
    # a record that cannot be read is named, not overwritten
    (out / "generate.json").write_text("{torn")
    assert main(base) == 2 and "generate.json (JSONDecodeError" in capsys.readouterr().err
    # a folder an older version wrote (no record) takes the run, which records its settings
    (out / "generate.json").unlink()
    assert main([*base, "--steps", "3"]) == 0
    assert json.loads((out / "generate.json").read_text())["settings"]["steps"] == 3
    # a record from before --afs existed (no "afs" key) holds images without it
    rec = json.loads((out / "generate.json").read_text())
    del rec["settings"]["afs"]
    (out / "generate.json").write_text(json.dumps(rec))
    assert main([*base, "--steps", "3", "--seeds", "0-6", "--skip-existing"]) == 0
    assert main([*base, "--steps", "3", "--seeds", "0-7", "--skip-existing", "--afs"]) == 2
    assert "afs: False there, True now" in capsys.readouterr().err


def test_generate_afs_images_are_solvers_afs_images(tmp_path, capsys):
    """generate --afs (any solver, Heun too, which then leaves EDM's fused sampler) draws what
    solvers.sample(afs=True) draws, and says the NFE it spent."""
    from PIL import Image

    from fdm_fast.generate import main
    from fdm_fast.snapshots import load_snapshot

    snap = tiny_snapshot(tmp_path / "snap.pt")
    data = torch.load(snap, weights_only=True)
    g = torch.Generator().manual_seed(0)  # weights off the init, whose zero output convs make F = 0
    data["ema"] = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                   for k, v in data["ema"].items()}
    torch.save(data, snap)
    net = load_snapshot(str(snap))
    a, b = (solvers.sample(net, [0], solver="dpm++2m", steps=4, afs=afs) for afs in (False, True))
    assert (a - b).abs().max() > 0.05  # so images drawn without --afs would not pass for these
    for solver, steps, nfe in (("heun", 3, 4), ("dpm++2m", 4, 3)):
        out = tmp_path / solver
        assert main(["--network", str(snap), "--seeds", "0-2", "--steps", str(steps), "--solver", solver, "--afs",
                     "--outdir", str(out)]) == 0
        assert f"{solver}, edm schedule, {steps} steps, analytic first step, NFE {nfe})" in capsys.readouterr().out
        want = solvers.sample(net, [0, 1, 2], solver=solver, steps=steps, afs=True)
        want = (want.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
        for i in range(3):
            got = torch.from_numpy(np.array(Image.open(out / "000000" / f"{i:06d}.png")))
            assert torch.equal(got, want[i, 0]), (solver, i)
