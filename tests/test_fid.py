"""Fréchet distance against scipy's sqrtm; the FID CLI's message when the Inception weights are absent."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fdm_fast.fid import frechet_distance

scipy_linalg = pytest.importorskip("scipy.linalg", reason="scipy (a scikit-learn dependency) provides the reference")


def scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy_linalg.sqrtm(s1 @ s2)  # no `disp`: deprecated in SciPy 1.17, gone in 1.18
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(covmean)))


@pytest.mark.parametrize("dim,n", [(8, 50), (64, 500), (256, 300)])
def test_frechet_distance_matches_scipy(dim, n):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.3
    b = rng.normal(size=(n, dim)) * 1.2 + 0.4
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    want = scipy_fid(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))


def test_fid_cli_without_weights_says_what_file_is_needed(tmp_path):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    env = dict(os.environ, PYTHONPATH=os.getcwd(), TORCH_HOME=str(tmp_path / "hub"))
    env.pop("FDM_FAST_INCEPTION", None)
    r = subprocess.run([sys.executable, "-m", "fdm_fast.fid", "calc", "--images", str(tmp_path), "--ref",
                        str(tmp_path / "ref.npz")], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert "weights-inception-2015-12-05-6726825d.pth" in r.stderr and "--inception" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "fdm_fast.fid", "ref", "--data", str(tmp_path), "--dest",
                        str(tmp_path / "x.npz"), "--inception", str(tmp_path / "nope.pth")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "nope.pth: no such file" in r.stderr and "Traceback" not in r.stderr


def test_sampler_speed_fid_study_pipeline(tmp_path):
    """The FID-vs-NFE study end to end with a stand-in feature extractor (the real Inception weights
    cannot be had here): snapshot -> samplers -> features -> statistics -> Frechet distance."""
    import argparse
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sampler_speed
    from fdm_fast.fid import features, statistics
    from fdm_fast.nn import build_denoiser

    cfg = dict(precond="fdm_edm", arch="ddpmpp", img_resolution=8, img_channels=1,
               network=dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,)))
    torch.manual_seed(0)
    torch.save(dict(config=cfg, ema=build_denoiser(cfg).state_dict()), tmp_path / "snap.pt")
    proj = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(1))
    stand_in = lambda x: (x.float().reshape(len(x), -1) / 255) @ proj  # noqa: E731
    real = [torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8) for _ in range(3)]
    mu, sigma = statistics(features(stand_in, real, "cpu"))
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    from fdm_fast import solvers

    args = argparse.Namespace(network=tmp_path / "snap.pt", ref=tmp_path / "ref.npz", inception=None, nfe=[3, 5],
                              fid_num=24, batch=[12], solvers=list(solvers.SOLVERS), schedule="edm")
    rows = sampler_speed.nfe_fid(args, torch.device("cpu"), extractor=stand_in)
    assert [(r["sampler"], r["nfe"]) for r in rows] == [(s, n) for s in solvers.SOLVERS for n in (3, 5)]
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in rows)
