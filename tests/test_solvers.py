"""fdm_fast.solvers: every solver against the samplers it generalises, measured orders of convergence
against an exact solution, the exponential-integrator weights, guidance against a float64 loop
written here, NFE counts, the SDE's noise, and backends and schedules."""

import math

import pytest
import torch

from conftest import requires_triton_on_cpu
from fdm_fast import ops, sampling, solvers
from fdm_fast.gmm import GaussianMixtureDenoiser
from fdm_fast.schedules import time_steps


def gaussian(precond="edm", s=0.5, d=(3, 4, 4)):
    """One Gaussian N(mu, s^2 I): its probability-flow ODE has the closed-form solution
    x(sigma) = mu + (x_T - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2))."""
    mu = torch.randn(1, math.prod(d), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return GaussianMixtureDenoiser(mu, torch.tensor([s]), torch.ones(1), d, precond)


def exact_endpoint(g, seeds, steps, schedule):
    """What an exact solver returns: the ODE solution at the last nonzero sigma, then D there (every
    solver's last step to sigma = 0 is the denoised estimate)."""
    ts = time_steps(steps, schedule, precond=g.precond)
    t0, tl, s2 = float(ts[0]), float(ts[-2]), float(g.stds[0]) ** 2
    xT = t0 * ops.randn((len(seeds), *g.shape), seed=torch.tensor(seeds), offset=0, backend="torch").double()
    mu = g.means[0].reshape(1, *g.shape)
    xl = mu + (xT - mu) * math.sqrt((s2 + tl**2) / (s2 + t0**2))
    return mu + s2 / (s2 + tl**2) * (xl - mu)


@pytest.mark.parametrize("solver,other", [
    ("heun", lambda g, s, n: sampling.edm_sampler(g, s, num_steps=n, device="cpu")),
    ("euler", lambda g, s, n: sampling.edm_sampler(g, s, num_steps=n, heun=False, device="cpu"))])
@pytest.mark.parametrize("precond", ["fdm_edm", "fdm_vp"])
def test_solvers_equal_edm_samplers_fused_steps(solver, other, precond):
    # heun and euler on ops.multistep against EDM's own fused step ops (sampling.edm_sampler); dpm++2m
    # and ipndm are checked against independent float64 implementations in tests/test_sampling.py
    g = GaussianMixtureDenoiser.random(k=4, shape=(3, 4, 4), seed=2, precond=precond)
    seeds = list(range(12))
    a, b = solvers.sample(g, seeds, solver=solver, steps=9), other(g, seeds, 9)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # float32 rounding of different arithmetic


@pytest.mark.parametrize("schedule", ["edm", "logsnr"])
@pytest.mark.parametrize("solver,order,want", [
    ("euler", None, 1), ("heun", None, 2), ("dpm++2m", None, 2), ("dpm++3m", 2, 2), ("dpm++3m", 3, 3),
    ("unipc", 1, 2), ("unipc", 2, 3), ("unipc", 3, 3)])  # UniPC-p with its corrector: p + 1 (4.05 on edm)
def test_multistep_orders(solver, order, want, schedule):
    # float64 steps on the Gaussian, N = 16 -> 128: the error's slope in log2 over the last two doublings
    g, seeds = gaussian(), list(range(16))
    errs = []
    for n in (16, 32, 64, 128):
        x = solvers.sample(g, seeds, solver=solver, steps=n, schedule=schedule, order=order, backend="torch",
                           net_dtype=torch.float64, state_dtype=torch.float64)
        errs.append((x - exact_endpoint(g, seeds, n, schedule)).pow(2).mean().sqrt().item())
    slope = math.log2(errs[1] / errs[3]) / 2
    assert slope > want - 0.25, f"{solver} (order {order}, {schedule}): measured order {slope:.2f}, errors {errs}"
    assert slope < max(want, 2) + 1.5, f"{solver}: order {slope:.2f} is implausibly high: errors {errs}"


def test_exp_multistep_weights_integrate_polynomials_exactly():
    h, nodes = 0.37, [0.0, -0.3, -0.71]
    w = solvers.exp_multistep_weights(h, nodes)
    tau = torch.linspace(0, h, 200001, dtype=torch.float64)
    for m in range(3):  # int_0^h e^{tau - h} tau^m by the trapezoid rule on a fine grid
        want = torch.trapezoid(torch.exp(tau - h) * tau**m, tau).item()
        got = sum(wj * t**m for wj, t in zip(w, nodes))
        assert abs(got - want) < 1e-10, (m, got, want)


def test_published_third_order_form_is_second_order_and_ours_third():
    """x' = D(lambda) - x in lambda with D = cos: exact history, uniform steps h. The update
    x + phi_2 D1 - c phi_3 D2 with c = 1 (the commonly published form) against c = 2 (the exact
    quadratic integral, what solvers.exp_multistep_weights gives)."""
    def run(n, c):
        lam0, lam1 = 0.0, 2.0
        h = (lam1 - lam0) / n
        exact = lambda lam: (math.exp(-(lam - lam0)) * 0.5 + (math.sin(lam) + math.cos(lam)) / 2  # noqa: E731
                             - math.exp(-(lam - lam0)) * (math.sin(lam0) + math.cos(lam0)) / 2)
        x = exact(lam0 + 2 * h)  # exact history for the first two steps
        for i in range(2, n):
            lam = lam0 + i * h
            D0, D1_, D2_ = math.cos(lam), math.cos(lam - h), math.cos(lam - 2 * h)
            phi1 = math.expm1(-h)
            phi2 = phi1 / h + 1
            phi3 = phi2 / h - 0.5
            d1_0, d1_1 = D0 - D1_, D1_ - D2_  # r0 = r1 = 1
            d1 = d1_0 + (d1_0 - d1_1) * 0.5
            d2 = (d1_0 - d1_1) / 2
            x = math.exp(-h) * x - phi1 * D0 + phi2 * d1 - c * phi3 * d2
        return abs(x - exact(lam1))

    def order(c):
        e = [run(n, c) for n in (40, 80, 160, 320)]
        return math.log2(e[0] / e[-1]) / 3
    assert order(1) < 2.3, order(1)  # 1.5 here (its error changes sign on the way; asymptotically 2)
    assert 2.8 < order(2) < 3.3, order(2)
    # and exp_multistep_weights is that c = 2 update
    h = 0.1
    w = solvers.exp_multistep_weights(h, [0.0, -h, -2 * h])
    phi1 = math.expm1(-h)
    phi2, phi3 = phi1 / h + 1, (phi1 / h + 1) / h - 0.5
    # x + phi2 d1 - 2 phi3 d2 as weights on D0, D1, D2 (r0 = r1 = 1)
    want = [-phi1 + phi2 * 1.5 - 2 * phi3 * 0.5, phi2 * -2 - 2 * phi3 * -1, phi2 * 0.5 - 2 * phi3 * 0.5]
    assert max(abs(a - b) for a, b in zip(w, want)) < 1e-12, (w, want)


class Counting(torch.nn.Module):
    """Wraps a denoiser and counts network calls and images evaluated."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.images = inner, 0, 0
        self.precond, self.img_channels, self.img_resolution = inner.precond, inner.img_channels, inner.img_resolution
        self.label_dim = getattr(inner, "label_dim", 0)

    def raw(self, net_in, sigma, class_labels=None, augment_labels=None):
        self.calls += 1
        self.images += net_in.shape[0]
        return self.inner.raw(net_in, sigma, class_labels)


class Conditional(torch.nn.Module):
    """A class-conditional analytic denoiser: the mixture's component means shifted by the label."""

    def __init__(self, precond="fdm_edm"):
        super().__init__()
        self.g = GaussianMixtureDenoiser.random(k=3, shape=(1, 2, 2), seed=4, precond=precond)
        self.precond, self.img_channels, self.img_resolution, self.label_dim = self.g.precond, 1, 2, 3

    def denoise(self, x, sigma, labels):
        shift = 0.0 if labels is None else (labels.to(torch.float64) @ torch.arange(1.0, 4.0, dtype=torch.float64))
        shift = torch.as_tensor(shift, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return self.g.denoise(x - shift, sigma) + shift

    def raw(self, net_in, sigma, class_labels=None, augment_labels=None):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = self.precond.coefficients(s)
        x = net_in.to(torch.float64) / c_in
        return ((self.denoise(x, s.reshape(-1), class_labels) - c_skip * x) / c_out).to(net_in.dtype)


@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_nfe_is_what_nfe_says(solver):
    g = Counting(GaussianMixtureDenoiser.random(k=2, shape=(1, 2, 2), seed=1))
    solvers.sample(g, [0, 1, 2], solver=solver, steps=7)
    assert g.calls == solvers.nfe(solver, 7) and g.images == 3 * g.calls
    # classifier-free guidance: both branches in one batched call per evaluation
    c = Counting(Conditional())
    labels = torch.eye(3)[[0, 2, 1]]
    solvers.sample(c, [0, 1, 2], solver=solver, steps=7, guidance=1.5, class_labels=labels)
    assert c.calls == solvers.nfe(solver, 7) and c.images == 6 * c.calls


@pytest.mark.parametrize("precond", ["vp", "ve", "fdm_edm"])
@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_analytic_first_step_is_exact_for_gaussian_data_and_saves_one_nfe(solver, precond):
    """AFS replaces the first network evaluation by D = k x, the posterior mean of N(0, sigma_data^2) data:
    on exactly that data (the analytic denoiser) a run with AFS equals the run without, one NFE fewer;
    with guidance too (both branches are the analytic D). For EDM-style preconditionings k is c_skip, so
    the network output it stands for is zero; VP and VE make the replacement non-trivial."""
    data = GaussianMixtureDenoiser(torch.zeros(1, 48, dtype=torch.float64), torch.tensor([0.5]), torch.ones(1),
                                   (3, 4, 4), precond)
    seeds = list(range(6))
    plain, fast = Counting(data), Counting(data)
    want = solvers.sample(plain, seeds, solver=solver, steps=6)
    got = solvers.sample(fast, seeds, solver=solver, steps=6, afs=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    assert (plain.calls, fast.calls) == (solvers.nfe(solver, 6), solvers.nfe(solver, 6, afs=True))
    assert fast.calls == plain.calls - 1
    guide = Counting(data)  # autoguidance by the same data: D unchanged, both networks skip the first call
    got = solvers.sample(Counting(data), seeds, solver=solver, steps=6, afs=True, guide=guide, guidance=2.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    assert guide.calls == solvers.nfe(solver, 6, afs=True)
    if precond == "fdm_edm":  # on other data it is an approximation: another result (how good: benchmarks)
        other = GaussianMixtureDenoiser.random(k=3, shape=(3, 4, 4), seed=2, precond=precond)
        a = solvers.sample(other, seeds, solver=solver, steps=6)
        assert not torch.allclose(a, solvers.sample(other, seeds, solver=solver, steps=6, afs=True))


def test_analytic_first_step_needs_a_network_evaluation_left():
    with pytest.raises(ValueError, match="analytic first step leaves euler with 1 step"):
        solvers.check_options("euler", 1, afs=True)
    solvers.check_options("euler", 2, afs=True)
    solvers.check_options("heun", 2, afs=True)  # NFE 3 - 1


def _euler_guided_float64(net, seeds, steps, w, labels, guide=None):
    """Euler with D = D_guide + w (D_main - D_guide), written out in float64."""
    p = net.precond
    t = [float(v) for v in time_steps(steps, precond=p)]
    x = t[0] * ops.randn((len(seeds), net.img_channels, net.img_resolution, net.img_resolution),
                         seed=torch.tensor(seeds), offset=0, backend="torch").double()
    for s, sn in zip(t[:-1], t[1:]):
        Dm = net.denoise(x, s, labels) if guide is None else net.g.denoise(x, s)
        Dg = net.denoise(x, s, torch.zeros_like(labels)) if guide is None else guide.denoise(x, s)
        D = Dg + w * (Dm - Dg)
        x = x + (sn - s) * (x - D) / s
    return x


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_classifier_free_guidance_matches_a_float64_loop(w):
    net, seeds = Conditional(), list(range(6))
    labels = torch.eye(3)[[0, 1, 2, 0, 1, 2]]
    got = solvers.sample(net, seeds, solver="euler", steps=12, guidance=w, class_labels=labels)
    want = _euler_guided_float64(net, seeds, 12, w, labels.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_autoguidance():
    main = GaussianMixtureDenoiser.random(k=3, shape=(1, 2, 2), seed=4)
    weak = GaussianMixtureDenoiser(main.means, main.stds * 2, main.weights, (1, 2, 2))
    seeds = list(range(6))
    got = solvers.sample(main, seeds, solver="euler", steps=12, guidance=2.0, guide=weak)
    holder = type("H", (), {"g": main, "precond": main.precond, "img_channels": 1, "img_resolution": 2})()
    want = _euler_guided_float64(holder, seeds, 12, 2.0, torch.zeros(6, 3), guide=weak)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # a guide that is the main network changes nothing, whatever w
    for solver in ("dpm++3m", "unipc"):
        torch.testing.assert_close(solvers.sample(main, seeds, solver=solver, steps=8, guidance=3.0, guide=main),
                                   solvers.sample(main, seeds, solver=solver, steps=8), rtol=1e-5, atol=1e-5)


def test_guidance_errors():
    g = GaussianMixtureDenoiser.random(k=2, shape=(1, 2, 2), seed=1)
    with pytest.raises(ValueError, match="classifier-free guidance needs a class-conditional network"):
        solvers.sample(g, [0], solver="euler", steps=3, guidance=2.0)
    with pytest.raises(ValueError, match="class_labels: classifier-free guidance needs the labels"):
        solvers.sample(Conditional(), [0], solver="euler", steps=3, guidance=2.0)
    other = GaussianMixtureDenoiser.random(k=2, shape=(1, 2, 2), seed=1, precond="vp")
    with pytest.raises(ValueError, match=r"guide: expected a network with the main network's preconditioning"):
        solvers.sample(g, [0], solver="euler", steps=3, guidance=2.0, guide=other)
    with pytest.raises(ValueError, match="guidance: expected a finite number"):
        solvers.sample(g, [0], solver="euler", steps=3, guidance=float("nan"))
    with pytest.raises(ValueError, match="solver: expected one of euler, heun"):
        solvers.sample(g, [0], solver="rk45", steps=3)
    with pytest.raises(ValueError, match="schedule: expected one of edm, logsnr, time"):
        solvers.sample(g, [0], solver="euler", steps=3, schedule="cosine")
    with pytest.raises(ValueError, match="order: unipc takes order 1, 2, 3, got 4"):
        solvers.sample(g, [0], solver="unipc", steps=3, order=4)
    with pytest.raises(ValueError, match="steps: expected an integer >= 1"):
        solvers.sample(g, [0], solver="euler", steps=0)
    with pytest.raises(ValueError, match="order: heun has no order option, got 2"):
        solvers.check_options("heun", 5, "edm", 2)


def test_sde_noise_is_per_seed_and_stochastic():
    g = GaussianMixtureDenoiser.random(k=3, shape=(3, 4, 4), seed=2, precond="fdm_edm")
    a = solvers.sample(g, [0, 1, 2, 3], solver="dpm++2m-sde", steps=10)
    b = solvers.sample(g, [2, 3], solver="dpm++2m-sde", steps=10)
    torch.testing.assert_close(a[2:], b, rtol=0, atol=0)  # an image depends on its seed only
    ode = solvers.sample(g, [0, 1, 2, 3], solver="dpm++2m", steps=10)
    assert (a - ode).abs().amax() > 1e-2  # the SDE's noise changed the samples
    # with the distribution right: many samples of the SDE match the mixture's mean
    many = solvers.sample(g, list(range(2000)), solver="dpm++2m-sde", steps=25).double().reshape(2000, -1)
    m, _ = g.moments()
    assert (many.mean(0) - m).norm() < 0.2 * m.norm()


@requires_triton_on_cpu
@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_triton_backend_matches_torch(solver):
    g = GaussianMixtureDenoiser.random(k=3, shape=(3, 4, 4), seed=2, precond="fdm_vp")
    a = solvers.sample(g, list(range(5)), solver=solver, steps=6, backend="triton")
    b = solvers.sample(g, list(range(5)), solver=solver, steps=6, backend="torch")
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_schedules():
    for name in ("vp", "ve", "edm", "fdm_vp"):
        from fdm_fast.schedules import get_precond, vp_sigma_inv
        p = get_precond(name)
        for sch in ("edm", "logsnr", "time"):
            t = time_steps(9, sch, precond=p)
            assert t[-1] == 0 and (t[:-1] > 0).all() and (t[1:] < t[:-1]).all(), (name, sch, t)
            assert abs(float(t[0]) - min(80.0, p.sigma_max)) < 1e-9 and abs(float(t[-2]) - max(0.002, p.sigma_min)) < 1e-9
        d = torch.diff(time_steps(9, "logsnr", precond=p)[:-1].log())
        assert (d - d[0]).abs().max() < 1e-12  # uniform in log sigma
    p = get_precond("vp")
    tt = vp_sigma_inv(time_steps(9, "time", precond=p)[:-1], p.beta_d, p.beta_min)
    assert (torch.diff(tt) - torch.diff(tt)[0]).abs().max() < 1e-9  # uniform in VP time
    with pytest.raises(ValueError, match="schedule: expected one of edm, logsnr, time, got 'x'"):
        time_steps(5, "x")


def test_cond_drop_trains_and_generate_names_solvers_and_guides(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from fdm_fast import generate, snapshots
    from fdm_fast.train import parse_args, resolve, training_loop

    tiny = ["--ds", "digits", "--resolution", "8", "--batch", "32", "--precision", "fp32", "--grid", "4",
            "--no-compile", "--cond", "--cond-drop", "0.5", "--kimg", "0.064", "--snap", "0.032"]
    training_loop(resolve(parse_args([*tiny, "--outdir", str(tmp_path)])), quiet=True)
    snap = str(sorted(tmp_path.glob("network-snapshot-*.pt"))[-1])
    net = snapshots.load_snapshot(snap, "cpu")
    assert net.config["network"]["label_dropout"] == 0.5 and net.model.label_dropout == 0.5
    labels = torch.eye(net.label_dim)[[3] * 4]
    for extra, kw in [
        (["--solver", "unipc", "--schedule", "logsnr", "--guidance", "2"], dict(solver="unipc", schedule="logsnr",
                                                                              guidance=2.0)),
        (["--solver", "dpm++3m", "--guidance", "1.5", "--guide-network", snap], dict(solver="dpm++3m", guidance=1.5,
                                                                                    guide=net)),
        (["--sampler", "dpm2m"], dict(solver="dpm++2m"))]:
        out = tmp_path / kw["solver"]
        assert generate.main(["--network", snap, "--seeds", "0-3", "--steps", "5", "--class", "3", "--outdir",
                              str(out), *extra]) == 0
        assert f"({kw['solver']}," in capsys.readouterr().out
        want = solvers.sample(net, [0, 1, 2, 3], steps=5, class_labels=labels, **kw)
        want = (want.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)[:, 0].numpy()
        for s in range(4):
            got = np.asarray(Image.open(out / f"000000/{s:06d}.png"))
            assert np.abs(got.astype(int) - want[s].astype(int)).max() <= 1, (extra, s)
    bad = [(["--solver", "unipc", "--S-churn", "5"], "--S-churn: stochastic churn is EDM's Heun/Euler option"),
           (["--solver", "unipc", "--order", "4"], "order: unipc takes order 1, 2, 3, got 4"),
           (["--sampler", "heun", "--solver", "unipc"], "--sampler heun and --solver unipc disagree"),
           (["--guide-network", str(tmp_path / "none.pt")], "--guide-network"),
           (["--class", "10"], "--class: expected 0..9, got 10"),
           (["--schedule", "cosine"], "invalid choice")]
    for extra, message in bad:
        with pytest.raises(SystemExit) if "invalid choice" in message else _nullcontext():
            rc = generate.main(["--network", snap, "--seeds", "0", "--grid", str(tmp_path / "g.png"), *extra])
            assert rc == 2
        assert message in capsys.readouterr().err, extra


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_cond_drop_needs_cond():
    from fdm_fast.train import parse_args, resolve

    with pytest.raises(SystemExit, match="--cond-drop: label dropout needs a class-conditional network"):
        resolve(parse_args(["--ds", "digits", "--cond-drop", "0.1"]))
    with pytest.raises(SystemExit, match=r"--cond-drop: expected a probability in \[0, 1\), got 1.0"):
        resolve(parse_args(["--ds", "digits", "--cond", "--cond-drop", "1"]))


@pytest.mark.parametrize("schedule", ["logsnr", "edm"])
def test_dpm3s_singlestep_third_order(schedule):
    """The official FDM code's DPM-Solver++(3S): D at sigma_min of its solution there, against the
    exact one, in float64, with runs whose last outer step is second order (steps - 1 = 3K + 2). Its
    order approaches 3 only at small steps (2.3 at K = 16 -> 32, 2.9 at 64 -> 128 here): K = 65 -> 257."""
    g, seeds = gaussian(), list(range(16))
    errs, Ks = [], []
    for n in (195, 387, 771):
        K = len(solvers.dpm3s_orders(n - 1))
        x = solvers.sample(g, seeds, solver="dpm3s", steps=n, schedule=schedule, backend="torch",
                           net_dtype=torch.float64, state_dtype=torch.float64)
        errs.append((x - exact_endpoint(g, seeds, K + 1, schedule)).pow(2).mean().sqrt().item())
        Ks.append(K)
    slope = math.log(errs[0] / errs[-1]) / math.log(Ks[-1] / Ks[0])
    assert 2.7 < slope < 4.0, (slope, errs)


def test_dpm3s_orders_spend_exactly_the_steps():
    for n in range(1, 40):
        o = solvers.dpm3s_orders(n)
        assert sum(o) == n and all(k in (1, 2, 3) for k in o), (n, o)
        assert o[: max(0, len(o) - 2)] == [3] * max(0, len(o) - 2) or n < 3


def _dpmpp_singlestep_float64(g, seeds, steps, schedule):
    """DPM-Solver++ singlestep (order 3, DPM-Solver's order plan, denoise_to_zero), written out in
    float64 from the update formulas of Lu et al. 2022 with alpha = 1 and the model D = g.denoise."""
    orders = solvers.dpm3s_orders(steps - 1)
    lam = -time_steps(len(orders) + 1, schedule, precond=g.precond)[:-1].log()
    sig = lambda v: torch.exp(-v)  # noqa: E731
    x = sig(lam[0]) * ops.randn((len(seeds), *g.shape), seed=torch.tensor(seeds), offset=0, backend="torch").double()
    for k, o in enumerate(orders):
        ls, lt = lam[k], lam[k + 1]
        h = lt - ls
        Ds = g.denoise(x, sig(ls))
        p1 = torch.expm1(-h)
        if o == 1:
            x = sig(lt) / sig(ls) * x - p1 * Ds
            continue
        r1 = 0.5 if o == 2 else 1 / 3
        x1 = sig(ls + r1 * h) / sig(ls) * x - torch.expm1(-r1 * h) * Ds
        D1 = g.denoise(x1, sig(ls + r1 * h))
        if o == 2:
            x = sig(lt) / sig(ls) * x - p1 * Ds - 0.5 / r1 * p1 * (D1 - Ds)
            continue
        r2 = 2 / 3
        p22 = torch.expm1(-r2 * h) / (r2 * h) + 1
        x2 = sig(ls + r2 * h) / sig(ls) * x - torch.expm1(-r2 * h) * Ds + r2 / r1 * p22 * (D1 - Ds)
        D2 = g.denoise(x2, sig(ls + r2 * h))
        x = sig(lt) / sig(ls) * x - p1 * Ds + 1 / r2 * (p1 / h + 1) * (D2 - Ds)
    return g.denoise(x, sig(lam[-1]))


@pytest.mark.parametrize("steps", [2, 3, 5, 7, 8, 12])
@pytest.mark.parametrize("precond", ["fdm_edm", "fdm_vp", "ve"])
def test_dpm3s_matches_a_float64_implementation(steps, precond):
    g = GaussianMixtureDenoiser.random(k=4, shape=(1, 3, 3), seed=5, precond=precond)
    got = solvers.sample(g, list(range(6)), solver="dpm3s", steps=steps, schedule="logsnr")
    want = _dpmpp_singlestep_float64(g, list(range(6)), steps, "logsnr")
    assert (got.double() - want).abs().max().item() <= 1e-4
