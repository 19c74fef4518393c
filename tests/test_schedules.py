"""schedules.py against independent float64 formulas (scalar `math`, written from docs/design.md section 1)."""

import math

import pytest
import torch

from fdm_fast import schedules as S

BETA_D, BETA_MIN, SD = 19.9, 0.1, 0.5


def vp_sigma(t):
    return math.sqrt(math.expm1(0.5 * BETA_D * t * t + BETA_MIN * t))


def vp_inv(s):
    return (math.sqrt(BETA_MIN**2 + 2 * BETA_D * math.log1p(s * s)) - BETA_MIN) / BETA_D


RANGES = {"vp": (vp_sigma(1e-5), vp_sigma(1.0)), "ve": (0.02, 100.0), "edm": (0.002, 80.0)}


def expected(name, s, m=None):
    """(c_skip, c_out, c_in, c_noise, lambda) of docs/design.md 1.1-1.2, in plain float64 math."""
    base = name.replace("fdm_", "")
    if base == "vp":
        c = (1.0, -s, 1 / math.sqrt(s * s + 1), 999 * vp_inv(s), 1 / s**2)
    elif base == "ve":
        c = (1.0, s, 1.0, math.log(s / 2), 1 / s**2)
    else:
        c = (SD**2 / (s * s + SD**2), s * SD / math.sqrt(s * s + SD**2), 1 / math.sqrt(s * s + SD**2),
             math.log(s) / 4, (s * s + SD**2) / (s * SD) ** 2)
    if name.startswith("fdm_"):
        lo, hi = RANGES[base]
        tau = (s - lo) / (hi - lo)
        B = 0.1 * tau + 0.5 * 19.9 * tau * tau
        c = (c[0], c[1], math.exp(-m * B) * (1 + m * B), c[3], c[4])
    return c


def sweep(name):
    lo, hi = RANGES[name.replace("fdm_", "")]
    inner = [lo * (hi / lo) ** (k / 40) for k in range(41)]  # log-spaced, both edges included
    return [lo, *inner, hi, hi * 1.5, lo * 0.5]  # and a little outside the range (EDM samples it)


@pytest.mark.parametrize("name", S.PRECONDS)
def test_coefficients_match_formulas(name):
    m = {"fdm_vp": 2.0, "fdm_ve": 1.0, "fdm_edm": 2.0}.get(name)
    p = S.get_precond(name)
    sig = sweep(name)
    got = p.coefficients(torch.tensor(sig, dtype=torch.float64)) + (p.loss_weight(torch.tensor(sig,
                                                                                                dtype=torch.float64)),)
    for k, label in enumerate(("c_skip", "c_out", "c_in", "c_noise", "lambda")):
        for i, s in enumerate(sig):
            want = expected(name, s, m)[k]
            assert got[k].dtype == torch.float64
            assert math.isclose(got[k][i].item(), want, rel_tol=1e-12, abs_tol=1e-14), (label, s, got[k][i].item(), want)
    assert (p.sigma_min, p.sigma_max) == pytest.approx(RANGES[name.replace("fdm_", "")], rel=1e-12)


@pytest.mark.parametrize("name", ["fdm_vp", "fdm_ve", "fdm_edm"])
@pytest.mark.parametrize("m", [0.5, 1.0, 2.0, 3.0])
def test_fdm_c_in_is_one_at_sigma_min_and_decreasing(name, m):
    p = S.get_precond(name, fdm_multiplier=m)
    s = torch.linspace(p.sigma_min, p.sigma_max, 2001, dtype=torch.float64)
    c_in = p.c_in(s)
    assert c_in[0].item() == 1.0
    assert (c_in[1:] < c_in[:-1]).all()
    assert c_in[-1].item() == pytest.approx(expected(name, p.sigma_max, m)[2], rel=1e-12)


def test_fdm_c_in_at_sigma_max_multiplier_2_is_tiny():
    # The fact: c_in ~ 4e-8 at sigma 80 with multiplier 2 (why fp16 cannot hold FDM inputs).
    c = S.get_precond("fdm_edm", fdm_multiplier=2.0).c_in(80.0).item()
    assert 3e-8 < c < 5e-8


def test_fdm_defaults_and_options():
    assert S.get_precond("fdm_edm").fdm_multiplier == 2.0
    assert S.get_precond("fdm_ve").fdm_multiplier == 1.0
    p = S.get_precond("edm", sigma_data=1.0)
    assert p.c_skip(0.0).item() == 1.0
    with pytest.raises(ValueError, match="fdm_multiplier"):
        S.get_precond("edm", fdm_multiplier=2.0)
    with pytest.raises(ValueError, match="fdm_multiplier"):
        S.get_precond("fdm_edm", fdm_multiplier=-1.0)
    with pytest.raises(ValueError, match="precond"):
        S.get_precond("ddpm")


def test_base_c_in_of_fdm_variant_is_unchanged_elsewhere():
    base, fdm = S.get_precond("edm"), S.get_precond("fdm_edm")
    s = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    for f in ("c_skip", "c_out", "c_noise", "loss_weight"):
        assert torch.equal(getattr(base, f)(s), getattr(fdm, f)(s))
    assert not torch.equal(base.c_in(s), fdm.c_in(s))


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_training_sigma_distribution(name):
    p = S.get_precond(name)
    g = torch.Generator().manual_seed(0)
    s = p.sample_sigma(200_000, generator=g, dtype=torch.float64)
    assert s.dtype == torch.float64 and s.shape == (200_000,)
    if name == "edm":
        ls = s.log()
        assert ls.mean().item() == pytest.approx(-1.2, abs=0.02)
        assert ls.std().item() == pytest.approx(1.2, abs=0.02)
    elif name == "ve":
        assert s.min() >= 0.02 and s.max() <= 100
        u = (s / 0.02).log() / math.log(100 / 0.02)  # uniform in log space
        assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    else:
        lo, hi = RANGES["vp"]
        assert s.min() >= lo * (1 - 1e-9) and s.max() <= hi * (1 + 1e-9)
        t = torch.tensor([vp_inv(v) for v in s[:2000].tolist()])  # t = 1 + u (eps - 1), u uniform
        assert t.min() >= 1e-5 - 1e-9 and t.max() <= 1 + 1e-9
        assert t.mean().item() == pytest.approx(0.5, abs=0.03)


def test_vp_inverse():
    t = torch.linspace(1e-5, 1, 101, dtype=torch.float64)
    assert torch.allclose(S.vp_sigma_inv(S.vp_sigma(t)), t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("warmup", [200, 400, 800])
def test_warmup_clamp(warmup):
    for k in [0, 1, warmup // 3, warmup // 2, warmup - 1]:
        want = 5 * 100 ** (k / warmup)
        assert S.warmup_clamp(k, warmup) == pytest.approx(want, rel=1e-12)
        assert want < 500
    assert S.warmup_clamp(0, warmup) == 5.0
    assert S.warmup_clamp(warmup, warmup) == math.inf  # 5 * 100 = 500: no clamp from there on
    assert S.warmup_clamp(10 * warmup, warmup) == math.inf
    assert S.warmup_clamp(3, None) == math.inf
    with pytest.raises(ValueError, match="step"):
        S.warmup_clamp(-1, warmup)


@pytest.mark.parametrize("N,rho", [(18, 7.0), (1, 7.0), (2, 3.0), (40, 7.0)])
def test_edm_time_steps(N, rho):
    smin, smax = 0.002, 80.0
    t = S.edm_time_steps(N, sigma_min=smin, sigma_max=smax, rho=rho)
    assert t.shape == (N + 1,) and t.dtype == torch.float64 and t[-1].item() == 0.0
    for i in range(N):
        frac = i / (N - 1) if N > 1 else 0.0
        want = (smax ** (1 / rho) + frac * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        assert t[i].item() == pytest.approx(want, rel=1e-12)
    assert t[0].item() == pytest.approx(smax)
    if N > 1:
        assert t[N - 1].item() == pytest.approx(smin)


def test_edm_time_steps_clipped_to_precond():
    p = S.get_precond("ve")  # supported [0.02, 100]
    t = S.edm_time_steps(18, precond=p)
    assert t[0].item() == pytest.approx(80.0) and t[17].item() == pytest.approx(0.02)
    with pytest.raises(ValueError, match="num_steps"):
        S.edm_time_steps(0)
