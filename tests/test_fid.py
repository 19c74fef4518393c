"""Fréchet distance against scipy's sqrtm; the FID CLI's message when the Inception weights are absent."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_snapshot
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
    from PIL import Image

    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    imgs = tmp_path / "imgs"  # readable images: they are read before the weights are looked for
    imgs.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 60 * i, dtype=np.uint8)).save(imgs / f"{i}.png")
    env = dict(os.environ, PYTHONPATH=os.getcwd(), TORCH_HOME=str(tmp_path / "hub"))
    env.pop("FDM_FAST_INCEPTION", None)
    r = subprocess.run([sys.executable, "-m", "fdm_fast.fid", "calc", "--images", str(imgs), "--ref",
                        str(tmp_path / "ref.npz")], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert "weights-inception-2015-12-05-6726825d.pth" in r.stderr and "--inception" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "fdm_fast.fid", "ref", "--data", str(imgs), "--dest",
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

    tiny_snapshot(tmp_path / "snap.pt")
    proj = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(1))
    stand_in = lambda x: (x.float().reshape(len(x), -1) / 255) @ proj  # noqa: E731
    real = [torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8) for _ in range(3)]
    mu, sigma = statistics(features(stand_in, real, "cpu"))
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    from fdm_fast import solvers

    args = argparse.Namespace(network=tmp_path / "snap.pt", ref=tmp_path / "ref.npz", inception=None, nfe=[3, 5],
                              fid_num=24, batch=[12], solvers=list(solvers.SOLVERS), schedule="edm", afs=False)
    from fdm_fast.snapshots import load_snapshot

    net = load_snapshot(str(args.network))
    rows = sampler_speed.nfe_fid(args, net, torch.device("cpu"), extractor=stand_in)
    assert [(r["sampler"], r["nfe"]) for r in rows] == [(s, n) for s in solvers.SOLVERS for n in (3, 5)]
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in rows)
    # --afs: rows named solver+afs, at the NFE asked for (heun's NFE is even with it: the nearest below)
    args.afs, args.solvers = True, ["dpm++2m", "heun"]
    rows = sampler_speed.nfe_fid(args, net, torch.device("cpu"), extractor=stand_in)
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("dpm++2m+afs", 3), ("dpm++2m+afs", 5), ("heun+afs", 2),
                                                        ("heun+afs", 4)]
    # a class-conditional network is sampled with the labels fid calc --network gives (seed s: class s mod
    # label_dim), not with none (EDM's zero label: the unconditional branch; it sampled that before)
    from fdm_fast.sampling import seed_labels

    with pytest.warns(UserWarning, match="no checksum file"):
        cond = load_snapshot(str(tiny_snapshot(tmp_path / "cond.pt", label_dim=10)))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # an untrained SongUNet ignores its labels (zero-initialised output convs): perturb
        for prm in cond.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=g))
    got = torch.cat(list(sampler_speed._samples_uint8(cond, "heun", 3, 6, 4, torch.device("cpu"))))
    want = solvers.sample(cond, range(6), solver="heun", steps=3, class_labels=seed_labels(range(6), 10))
    assert torch.equal(got, (want.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8))
    unlabelled = solvers.sample(cond, range(6), solver="heun", steps=3)
    assert not torch.equal(got, (unlabelled.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8))


def test_sampler_speed_digits_fd_study_end_to_end(tmp_path, capsys):
    """`sampler_speed.py --network SNAP --metric digits-fd` (no download): one row per solver and NFE with a
    finite FD, and a snapshot of other images refused before the speed part, naming --metric."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import sampler_speed

    def snapshot(name, resolution):
        return str(tiny_snapshot(tmp_path / name, resolution, attn=False))

    study = ["--no-speed", "--no-nfe-study", "--metric", "digits-fd", "--nfe", "3", "--fid-num", "16",
             "--batch", "16", "--solvers", "euler", "heun", "--out", str(tmp_path / "out")]
    sampler_speed.main(["--network", snapshot("d16.pt", 16), *study])
    rows = json.loads((tmp_path / "out" / "sampler_speed.json").read_text())["rows"]
    assert [(r["sampler"], r["nfe"], r["images"]) for r in rows] == [("euler", 3, 16), ("heun", 3, 16)]
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in rows)
    assert "digits FD vs NFE" in capsys.readouterr().out
    from PIL import Image

    with Image.open(tmp_path / "out" / "sampler_speed.png") as im:  # the quality-vs-NFE panel alone
        assert im.size == (720, 440)
    with pytest.raises(SystemExit):
        sampler_speed.main(["--network", snapshot("d8.pt", 8), *study])
    assert "--metric digits-fd: scores 16x16 grayscale digits" in capsys.readouterr().err


def test_fid_cli_ref_and_calc_end_to_end_with_a_stand_in_extractor(tmp_path, monkeypatch, capsys):
    """`fid ref` then `fid calc` (on the same images, on generated ones, and on a folder of generate's
    PNGs in subfolders) through the CLI's own code, the Inception network replaced by a fixed random
    projection (its weights cannot be had here): the .npz holds the features' mean and covariance in
    float64, the same images score 0, and each pass shows a progress bar in images."""
    import torch
    from PIL import Image

    from fdm_fast import fid

    proj = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = []

    def stand_in(x):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 8, 8)  # grayscale repeated to RGB
        seen.append(len(x))
        return (x.double().reshape(len(x), -1) / 255) @ proj

    monkeypatch.setattr(fid, "load_inception", lambda path, device: stand_in)
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    imgs = rng.integers(0, 256, (45, 8, 8), dtype=np.uint8)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(data / f"img{i:03d}.png")
    ref = tmp_path / "refs" / "ref.npz"
    assert fid.main(["ref", "--data", str(data), "--dest", str(ref), "--batch", "20"]) == 0
    assert seen == [20, 20, 5]
    want = (torch.from_numpy(imgs).double().reshape(45, -1).repeat(1, 3) / 255 @ proj).numpy()
    with np.load(ref) as z:
        assert z["mu"].dtype == np.float64 and z["sigma"].shape == (16, 16)
        np.testing.assert_allclose(z["mu"], want.mean(0), rtol=1e-12)
        np.testing.assert_allclose(z["sigma"], np.cov(want, rowvar=False), rtol=1e-10)
    err = capsys.readouterr().err
    assert "fid ref" in err and "45/45" in err, err
    assert fid.main(["ref", "--data", str(data), "--dest", str(tmp_path / "refs" / "plain"), "--batch", "45"]) == 0
    assert sorted(p.name for p in ref.parent.iterdir()) == ["plain", "ref.npz"]  # the name asked for, no temp file
    assert f"wrote {tmp_path / 'refs' / 'plain'}" in capsys.readouterr().out

    assert fid.main(["calc", "--images", str(data), "--ref", str(ref)]) == 0
    out, err = capsys.readouterr()
    assert float(out.split("FID ")[1]) == pytest.approx(0.0, abs=1e-6) and "fid calc" in err and "45/45" in err

    tiny_snapshot(tmp_path / "snap.pt")
    with pytest.warns(UserWarning, match="no checksum file"):
        assert fid.main(["calc", "--network", str(tmp_path / "snap.pt"), "--num", "7", "--steps", "2",
                         "--batch", "4", "--ref", str(ref)]) == 0
    out, err = capsys.readouterr()
    assert float(out.split("FID ")[1]) > 0 and "7/7" in err

    nested = tmp_path / "out" / "000000"  # generate's layout: 1000 PNGs per subfolder
    nested.mkdir(parents=True)
    for i, a in enumerate(imgs[:30]):
        Image.fromarray(a).save(nested / f"{i:06d}.png")
    (nested / "000030.png.tmp123").write_bytes(b"a killed run's partial PNG")  # not an image: skipped
    assert fid.main(["calc", "--images", str(tmp_path / "out"), "--ref", str(ref)]) == 0
    out, err = capsys.readouterr()
    assert float(out.split("FID ")[1]) > 0 and "30/30" in err
    assert fid.main(["calc", "--images", str(tmp_path / "refs"), "--ref", str(ref)]) == 2  # no images in it
    assert "contains no images" in capsys.readouterr().err
    # generate's own folder: the settings its generate.json records are printed with the FID
    from fdm_fast import generate

    with pytest.warns(UserWarning, match="no checksum file"):
        assert generate.main(["--network", str(tmp_path / "snap.pt"), "--seeds", "0-4", "--steps", "2", "--outdir",
                              str(tmp_path / "gen")]) == 0
    capsys.readouterr()
    assert fid.main(["calc", "--images", str(tmp_path / "gen"), "--ref", str(ref)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'gen'}: 5 images made by generate with network_sha256 " in out and ", steps 2," in out, out
    assert float(out.split("FID ")[1]) > 0
