"""Fréchet distance against scipy's sqrtm; the FID CLI's message when the Inception weights are absent."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fdm_fast.fid import frechet_distance

scipy_linalg = pytest.importorskip("scipy.linalg", reason="scipy (a scikit-learn dependency) provides the reference")


def scipy_fid(mu1, s1, mu2, s2):
    covmean, _ = scipy_linalg.sqrtm(s1 @ s2, disp=False)
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
