"""Every command-line tool against bad input: one row per case with the exit status and a fragment of
the message, checked before any work is done (no traceback, nothing half-written left behind)."""

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_snapshot
from fdm_fast import dataset_tool, fid, generate, train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--ds", "digits", "--resolution", "8", "--batch", "16", "--precision", "fp32", "--no-compile",
        "--kimg", "0.032"]


def _png(arr):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="png")
    return buf.getvalue()


def _zip(path, *, bad_crc=False, labels=None):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(4):
            zf.writestr(f"img{i}.png", _png(np.full((8, 8), 40 * i, dtype=np.uint8)))
        if labels is not None:
            zf.writestr("dataset.json", labels)
    if bad_crc:  # flip one byte inside the first stored member's data
        data = bytearray(Path(path).read_bytes())
        data[60] ^= 0xFF
        Path(path).write_bytes(bytes(data))
    return str(path)


def _without_its_folder(argv) -> bool:
    """A row about /proc or /sys (folders that refuse new files even to root) on a system that has none."""
    return any(a.startswith(root) and not os.path.isdir(root) for a in argv for root in ("/proc", "/sys"))


def _run(tool, argv, capsys):
    """(exit status, stderr) of a tool's main(argv), in-process."""
    try:
        rc = tool.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


TRAIN_ROWS = [
    (["--lr", "-1"], "--lr: expected a positive learning rate"),
    (["--lr", "nan"], "--lr: expected a positive learning rate"),
    (["--resolution", "3"], "--resolution: expected a multiple of 4"),
    (["--resolution", "0"], "--resolution: expected a multiple of 4"),
    (["--keep", "0"], "--keep: expected at least 1"),
    (["--ckpt-minutes", "-1"], "--ckpt-minutes: expected minutes >= 0"),
    (["--ckpt-minutes", "inf"], "--ckpt-minutes: expected minutes >= 0"),
    (["--transfer", "nope.pt"], "--transfer nope.pt: no such file"),
    (["--grid", "0"], "--grid: expected at least 1 image"),
    (["--grid-steps", "0"], "--grid-steps: expected at least 1 step"),
    (["--dropout", "1.5"], "--dropout: expected a probability in [0, 1)"),
    (["--batch", "0"], "--batch: expected a positive integer"),
    (["--kimg", "-1"], "--kimg: expected a positive training length, got -1.0"),
    (["--snap", "0"], "--snap: expected a positive number of kimg"),
    (["--backend", "bogus"], "expected one of torch, triton, cuda, cpu"),
    (["--backend", "cuda"], "not available"),
    (["--precond", "fdm_edm", "--precision", "fp16"], "--precision fp16 with an FDM preconditioning"),
    (["--fdm-multiplier", "2", "--precond", "edm"], "--fdm-multiplier applies to the fdm_* preconditionings"),
]


@pytest.mark.parametrize("extra, message", TRAIN_ROWS, ids=[" ".join(r[0]) for r in TRAIN_ROWS])
def test_train_bad_options(tmp_path, capsys, extra, message):
    rc, err = _run(train, [*TINY, "--outdir", str(tmp_path / "run"), *extra], capsys)
    assert rc == 2 and message in err, err
    assert not (tmp_path / "run" / "stats.jsonl").exists()  # refused before any work


def test_train_bad_data(tmp_path, capsys):
    rows = [
        (["--ds", str(tmp_path / "nonexistent.zip")], "--ds " + str(tmp_path / "nonexistent.zip") + ": no such file"),
        (["--ds", "custom", "--data", str(tmp_path / "none.zip")], "--data " + str(tmp_path / "none.zip")),
        (["--ds", _zip(tmp_path / "crc.zip", bad_crc=True)], "the zip member is damaged"),
        (["--ds", _zip(tmp_path / "lab.zip", labels="{not json"), "--cond"], "not a valid dataset.json"),
        (["--resume", str(tmp_path / "missing.pt")], "no such file"),
        (["--outdir", "/proc/fdm_fast_cannot_write_here"], "--outdir /proc/fdm_fast_cannot_write_here: cannot create"),
        (["--outdir", "/proc"], "--outdir /proc: cannot write files there"),  # os.access says yes to root here
    ]
    for extra, message in rows:
        if _without_its_folder(extra):
            continue
        argv = [a for a in TINY if a not in ("--ds", "digits", "--resolution", "8")] if extra[0] == "--ds" else TINY
        argv = [*argv, "--outdir", str(tmp_path / "run"), *extra]
        rc, err = _run(train, argv, capsys)
        assert rc == 2 and message in err, (extra, err)
        assert not (tmp_path / "run").exists(), (extra, "a refused run left its new --outdir behind")


def test_error_lines_leave_in_one_write(tmp_path, monkeypatch):
    """Ranks that fail (or stop) together under torchrun share one stderr pipe, and print() writes the
    text and the newline apart, so their lines could run into each other: each line is one write."""
    writes = []

    class Recorder(io.StringIO):
        def write(self, s):
            writes.append(s)
            return len(s)

    monkeypatch.setattr(sys, "stderr", Recorder())
    assert train.main([*TINY, "--outdir", str(tmp_path / "run"), "--lr", "-1"]) == 2  # train.main's SystemExit
    assert train.main([*TINY, "--outdir", str(tmp_path / "run"), "--resume", str(tmp_path / "none.pt")]) == 2
    assert generate.main(["--network", str(tmp_path / "none.pt"), "--grid", str(tmp_path / "g.png")]) == 2
    errors = [w for w in writes if "error:" in w]
    assert len(errors) == 3 and all(w.startswith("error: ") and w.endswith("\n") for w in errors), writes
    assert "\n" not in writes, writes  # no newline written on its own


def test_train_help_shows_the_digits_defaults():
    r = subprocess.run([sys.executable, "-m", "fdm_fast.train", "--help"], capture_output=True, text=True, cwd=ROOT)
    text = " ".join(r.stdout.split())  # argparse wraps lines
    assert r.returncode == 0 and "digits 0.001" in text and "digits 0.01)" in text, text


def test_generate_and_fid_help_name_every_snapshot_format_they_load(capsys):
    # snapshots.load_snapshot reads fdm_fast .pt, official .pkl and .safetensors: --help says so
    for main, argv in ((generate.main, ["--help"]), (fid.main, ["calc", "--help"])):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert ".pt" in text and ".pkl" in text and ".safetensors" in text, text


def test_generate_bad_options(tmp_path, capsys):
    snap = tmp_path / "snap.pt"
    snap.write_bytes(b"x")
    rows = [
        (["--batch", "0"], "--batch: expected a positive integer"),
        (["--steps", "0"], "--steps: expected a positive integer"),
        (["--grid", str(tmp_path / "snap.pt" / "g.png")], "g.png: cannot create its folder"),
        (["--grid", "/proc/g.png"], "--grid /proc/g.png: cannot write files in its folder /proc"),  # though root
        (["--grid", str(tmp_path)], "is a folder; expected the PNG file to write"),
        (["--outdir", str(tmp_path / "snap.pt" / "out")], "--outdir " + str(tmp_path / "snap.pt" / "out") + ": cannot "
                                                           "create it"),
        (["--outdir", "/proc"], "--outdir /proc: cannot write files there"),
        (["--network", str(tmp_path / "none.pt")], "no such file"),
        (["--seeds", "5-1"], "error"),
        (["--sampler", "bogus"], "invalid choice"),
        # the sampler's numbers, refused before any work (they were a traceback at the first batch)
        (["--rho", "0"], "--rho: expected a positive finite number, got 0.0"),
        (["--sigma-max", "-1"], "--sigma-max: expected a positive number, got -1.0"),
        (["--sigma-min", "5", "--sigma-max", "1"], "--sigma-min 5 is above --sigma-max 1"),
        (["--sigma-min", "nan"], "--sigma-min: expected a finite number >= 0, got nan"),
        (["--S-noise", "nan"], "--S-noise: expected a finite number >= 0, got nan"),
        (["--S-churn", "-1"], "--S-churn: expected a finite number >= 0, got -1.0"),
        (["--S-min", "nan"], "--S-min: expected a number, got nan"),
        (["--guidance", "inf"], "--guidance: expected a finite number (1 = unguided), got inf"),
    ]
    for extra, message in rows:
        if _without_its_folder(extra):
            continue
        argv = ["--network", str(snap), "--grid", str(tmp_path / "g.png"), *extra]
        rc, err = _run(generate, argv, capsys)
        assert rc == 2 and message in err, (extra, err)
    # output folders are made only once every other option has passed
    rc, err = _run(generate, ["--network", str(tmp_path / "none.pt"), "--outdir", str(tmp_path / "out"), "--grid",
                              str(tmp_path / "grids" / "g.png")], capsys)
    assert rc == 2 and "none.pt: no such file" in err and not (tmp_path / "out").exists(), err
    assert not (tmp_path / "grids").exists()


def test_generate_grid_makes_its_folder(tmp_path, capsys):
    """--grid into a folder that does not exist yet: made before sampling, as --outdir, fid's --dest and
    dataset_tool's --dest are."""
    snap = tiny_snapshot(tmp_path / "snap.pt")
    grid = tmp_path / "new" / "sub" / "g.png"
    rc, err = _run(generate, ["--network", str(snap), "--seeds", "0-1", "--steps", "2", "--grid", str(grid)], capsys)
    assert rc == 0 and grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", err


def test_a_run_folder_stands_for_its_newest_snapshot(tmp_path, capsys):
    """--network / --guide-network / fid --network / train --transfer take a run folder: its newest
    network-snapshot-*.pt by the images in the name, or a convert folder's network-snapshot.pt."""
    import json

    from fdm_fast.snapshots import SnapshotError, network_file

    run = tmp_path / "run"
    run.mkdir()
    for name in ("network-snapshot-000001.pt", "network-snapshot-000004.pt", "network-snapshot-000004-544.pt",
                 "network-snapshot-000010.pt.sha256", "network-snapshot-000011.pkl", "training-state-00000999.pt",
                 "network-snapshot.pt"):
        (run / name).write_bytes(b"")
    assert network_file(str(run)) == str(run / "network-snapshot-000004-544.pt")
    assert network_file(str(run / "x.pt")) == str(run / "x.pt")  # a file path as it is, even a missing one
    conv = tmp_path / "converted"
    conv.mkdir()
    (conv / "network-snapshot.pt").write_bytes(b"")
    assert network_file(str(conv)) == str(conv / "network-snapshot.pt")
    with pytest.raises(SnapshotError, match="a folder without a network-snapshot"):
        network_file(str(tmp_path / "converted" / ".."))  # tmp_path: folders only
    # generate: the newest snapshot is used, named, and recorded in generate.json by its checksum
    tiny_snapshot(run / "network-snapshot-000004-544.pt")
    rc, err = _run(generate, ["--network", str(run), "--seeds", "0-1", "--steps", "2", "--outdir",
                              str(tmp_path / "out")], capsys)
    assert rc == 0, err
    from fdm_fast.snapshots import sha256_of

    rec = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert rec["settings"]["network_sha256"] == sha256_of(str(run / "network-snapshot-000004-544.pt"))
    rc, err = _run(generate, ["--network", str(conv / ".."), "--seeds", "0", "--grid", str(tmp_path / "g.png")],
                   capsys)
    assert rc == 2 and "--network" in err and "a folder without a network-snapshot-*.pt" in err
    assert train.resolve(train.parse_args(["--transfer", str(run)])).transfer == network_file(str(run))
    rc, err = _run(fid, ["calc", "--network", str(conv / ".."), "--ref", "x.npz"], capsys)
    assert rc == 2 and "--network" in err and "a folder without a network-snapshot-*.pt" in err


def test_generate_refused_with_the_network_leaves_no_new_folder(tmp_path, capsys):
    """Refusals that need the network come after --outdir's and --grid's folders are made (so that a bad
    folder is named before the network loads): those folders, and the parents made with them, go again."""
    snap = tiny_snapshot(tmp_path / "snap.pt")
    (tmp_path / "text.pt").write_text("not a snapshot\n")
    rows = [
        (["--network", str(tmp_path / "text.pt")], "text.pt: not a readable network snapshot"),
        (["--class", "2"], "--class: this network is unconditional"),
        (["--guidance", "2"], "--guidance 2.0: classifier-free guidance needs a class-conditional network"),
        (["--sigma-min", "100", "--sigma-max", "200"], "--sigma-min 100 / --sigma-max 200: nothing is left after "
                                                       "clipping to the network's noise range [0.002, 80] (fdm_edm)"),
    ]
    for extra, message in rows:
        rc, err = _run(generate, ["--network", str(snap), "--seeds", "0-1", "--steps", "2", "--outdir",
                                  str(tmp_path / "new" / "a" / "out"), "--grid", str(tmp_path / "grids" / "g.png"),
                                  *extra], capsys)
        assert rc == 2 and message in err, (extra, err)
        assert not (tmp_path / "new").exists() and not (tmp_path / "grids").exists(), extra
    # a folder that was there before stays, empty or not
    (tmp_path / "kept").mkdir()
    rc, err = _run(generate, ["--network", str(snap), "--seeds", "0", "--outdir", str(tmp_path / "kept"), "--class",
                              "2"], capsys)
    assert rc == 2 and (tmp_path / "kept").is_dir()


def test_fid_bad_options(tmp_path, capsys):
    """Each bad option is named before any work: here no Inception weights exist, so a row whose message is
    not the weights' shows that the check came before loading them."""
    (tmp_path / "text.npz").write_text("not numpy\n")
    np.save(tmp_path / "one.npy", np.zeros(4))
    np.savez(tmp_path / "nomu.npz", sigma=np.eye(4))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(4), sigma=np.eye(3))
    np.savez(tmp_path / "nan.npz", mu=np.array([0.0, np.nan]), sigma=np.eye(2))
    (tmp_path / "afile").write_text("")
    (tmp_path / "r.zip").write_bytes(b"PK\x03\x04" + bytes(60))  # a zip's magic, nothing after it
    np.savez(tmp_path / "ok.npz", mu=np.zeros(4), sigma=np.eye(4))
    good = _zip(tmp_path / "good.zip")  # readable images: the rows about --dest get past --data
    calc = ["calc", "--images", str(tmp_path), "--ref"]
    rows = [
        (calc + [str(tmp_path / "text.npz")], "text.npz: not reference statistics with 'mu' and 'sigma': not an .npz "
                                              "file (it begins b'not nump')\n"),
        (calc + [str(tmp_path / "one.npy")],
         "one.npy: expected an .npz with 'mu' and 'sigma', got a single array (.npy)"),
        (calc + [str(tmp_path / "r.zip")], "not reference statistics with 'mu' and 'sigma' (BadZipFile"),
        (calc + [str(tmp_path / "nomu.npz")], "(missing ['mu'])"),
        (calc + [str(tmp_path / "shape.npz")], "expected mu [D] and sigma [D, D], got [4] and [3, 3]"),
        (calc + [str(tmp_path / "nan.npz")], "mu or sigma holds NaN or inf"),
        (["ref", "--data", good, "--dest", str(tmp_path)], "is a folder; expected the file to write"),
        (["ref", "--data", good, "--dest", str(tmp_path / "afile" / "r.npz")], "cannot create its folder"),
        (["ref", "--data", good, "--dest", "/sys/r.npz"],
         "--dest /sys/r.npz: cannot write files in its folder"),
        (["calc", "--images", str(tmp_path), "--ref", str(tmp_path / "none.npz")], "no such file"),
        (["calc", "--network", str(tmp_path / "none.pt"), "--ref", str(tmp_path / "r.npz")], "--network"),
        (["ref", "--data", good, "--dest", str(tmp_path / "r.npz"), "--batch", "0"], "--batch: expected"),
        (["ref", "--data", good, "--dest", str(tmp_path / "r.npz")], "error"),  # no weights here
        # the images are read before Inception loads (here without weights: the dataset's message comes first)
        (["ref", "--data", str(tmp_path / "none.zip"), "--dest", str(tmp_path / "new" / "r.npz")], "none.zip"),
        (["calc", "--images", str(tmp_path / "r.zip"), "--ref", str(tmp_path / "ok.npz")], "r.zip"),
    ]
    for argv, message in rows:
        if _without_its_folder(argv):
            continue
        rc, err = _run(fid, argv, capsys)
        assert rc == 2 and message in err and err.count("error:") == 1, (argv, err)
    assert not (tmp_path / "new").exists()  # a bad --data is refused before --dest's folder is made


def test_dataset_tool_bad_input_leaves_nothing_behind(tmp_path, capsys):
    from PIL import Image

    bad = _zip(tmp_path / "crc.zip", bad_crc=True)
    (tmp_path / "mixed").mkdir()
    for name, size in (("a.png", 8), ("b.png", 10)):
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(tmp_path / "mixed" / name)
    rows = [
        (["--source", bad, "--dest", str(tmp_path / "out.zip")], "the zip member is damaged"),
        (["--source", _zip(tmp_path / "lab.zip", labels="[1, 2"), "--dest", str(tmp_path / "out2.zip")],
         "not a valid dataset.json"),
        (["--source", str(tmp_path / "none"), "--dest", str(tmp_path / "out3.zip")], "--source"),
        (["--source", bad, "--dest", str(tmp_path / "out4.zip"), "--resolution", "0"], "--resolution"),
        (["--source", bad, "--dest", str(tmp_path / "out5"), "--max-images", "0"], "--max-images"),
        (["--source", bad, "--dest", str(tmp_path / "crc.zip" / "out6.zip")], "out6.zip: cannot create its folder"),
        (["--source", str(tmp_path / "none"), "--dest", str(tmp_path / "out7.zip")], "none: no such file or folder"),
        # found mid-conversion, after --dest's new folders were made: they go again (they stayed, empty)
        (["--source", bad, "--dest", str(tmp_path / "out8" / "a" / "out.zip")], "the zip member is damaged"),
        (["--source", str(tmp_path / "mixed"), "--dest", str(tmp_path / "out9" / "ds")],
         "b.png: size (10, 10, 3) differs from the first image's (8, 8, 3); pass --resolution R"),
    ]
    for argv, message in rows:
        rc, err = _run(dataset_tool, argv, capsys)
        assert rc == 2 and message in err, (argv, err)
        if not any(w in message for w in ("damaged", "dataset.json", "differs")):  # those are found while reading
            assert "img/s" not in err, (argv, err)  # an option refused before the progress bar starts
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in left if n.startswith("out")], left  # no .zip.partial, no half folder


@pytest.mark.parametrize("script, argv, message", [
    ("sync_check.py", ["--steps", "0"], "expected positive integers"),
    ("ops_bandwidth.py", ["--sizes", "bogus"], "invalid choice"),
    ("train_throughput.py", ["--preset", "bogus"], "invalid choice"),
    ("sampler_speed.py", ["--preset", "bogus"], "invalid choice"),
    # bad files for the --network study: named before the speed part's minutes, not after them
    ("sampler_speed.py", ["--network", "none.pt"], "error: --network none.pt: no such file"),
    ("sampler_speed.py", ["--network", "README.md", "--metric", "digits-fd"], "error: --network README.md: not a "
                                                                               "readable network snapshot"),
    ("guidance_study.py", ["--network", "none.pt"], "error: --network none.pt: no such file"),
    # outputs that could not be written at the end are refused before the measuring (check_outputs)
    ("ops_bandwidth.py", ["--json", "benchmarks"], "--json benchmarks: is a folder; expected the file to write"),
    ("train_throughput.py", ["--results", "README.md/r.md"], "--results README.md/r.md: cannot create its folder"),
    ("train_throughput.py", ["--results", "/proc/r.md"], "--results /proc/r.md: cannot write files in its folder"),
    ("sampler_speed.py", ["--out", "README.md/x"], "--out README.md/x: cannot create it"),
    ("fdm_claims.py", ["--out", "README.md"], "--out README.md: cannot create it"),
    ("fdm_claims.py", ["--out", "/proc"], "--out /proc: cannot write files there"),
    ("guidance_study.py", ["--network", "none.pt", "--json", "README.md/g.json"], "cannot create its folder"),
])
def test_benchmark_scripts_bad_options(script, argv, message):
    if _without_its_folder(argv):
        pytest.skip("no /proc here")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *argv], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
