"""Run files under damage: checksums verified on load, --resume auto falls back past bad checkpoints,
stale temp files removed, stats.jsonl read as one run, snapshot names never collide, and generate
refuses bad network files with a message."""

import argparse
import functools
import json
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
import torch

from fdm_fast import generate, snapshots, train
from fdm_fast.train import training_loop
from test_train import tiny_options


def _run(path, *extra, steps):
    return training_loop(tiny_options(path, "--kimg", "100", "--ckpt", "0.032", "--snap", "0.064", *extra),
                         quiet=True, stop_after_steps=steps)


def test_corrupt_checkpoint_is_refused_and_auto_resume_falls_back(tmp_path, capsys):
    full = _run(tmp_path / "full", steps=6)
    run = tmp_path / "run"
    _run(run, steps=6)  # checkpoints at steps 1..6, the last 3 kept
    states = snapshots.checkpoints(str(run))
    assert [os.path.basename(p) for p in states] == [f"training-state-{s:08d}.pt" for s in (4, 5, 6)]
    newest = states[-1]
    with open(newest, "r+b") as f:  # 16 KiB overwritten in the middle
        f.seek(os.path.getsize(newest) // 2)
        f.write(os.urandom(16384))
    with pytest.raises(SystemExit, match="does not match its checksum"):
        _run(run, "--resume", newest, steps=1)
    open(states[-2], "w").close()  # the one before it: empty
    (run / "training-state-backup.pt").write_bytes(b"stray")  # not of the naming pattern: never considered
    resumed = training_loop(tiny_options(run, "--kimg", "100", "--ckpt", "0.032", "--resume", "auto"), quiet=False,
                            stop_after_steps=2)
    out = capsys.readouterr().out
    assert "skipping training-state-00000006.pt" in out and "checksum" in out
    assert "skipping training-state-00000005.pt" in out and "empty" in out
    assert "resumed from" in out and "training-state-00000004.pt" in out
    assert resumed["step"] == 6  # 4 + 2: the same point as the uninterrupted run
    for p, q in zip(full["net"].state_dict().values(), resumed["net"].state_dict().values()):
        assert torch.equal(p, q)


def test_truncated_newest_checkpoint_falls_back(tmp_path):
    _run(tmp_path, steps=3)
    newest = snapshots.checkpoints(str(tmp_path))[-1]
    data = Path(newest).read_bytes()
    Path(newest).write_bytes(data[: len(data) // 3])
    res = training_loop(tiny_options(tmp_path, "--kimg", "100", "--resume", "auto"), quiet=True, stop_after_steps=1)
    assert res["step"] == 3  # from step 2, plus one


def test_stale_temp_files_are_removed_and_stats_read_as_one_run(tmp_path):
    _run(tmp_path, "--tick", "0.016", steps=4)  # a tick and a checkpoint every step
    stale = [tmp_path / "training-state-00000009.pt.tmp123", tmp_path / "network-snapshot-000001.pt.sha256.tmp77",
             tmp_path / "samples-000000-512.png.tmp.png", tmp_path / "training.png.panel1.tmp9.png.tmp9.png",
             tmp_path / "metrics.png.tmp12.png"]
    for p in stale:
        p.write_bytes(b"half-written")
    keep = tmp_path / "notes.tmp1"  # not one of ours
    keep.write_text("mine")
    # as if killed after step 4's tick but before a checkpoint at step 5, 6: drop rows 5, 6 on resume
    with open(tmp_path / "stats.jsonl", "a") as f:
        f.write(json.dumps(dict(step=5, kimg=0.08, loss=1.0)) + "\n" + json.dumps(dict(step=6)) + "\n")
    training_loop(tiny_options(tmp_path, "--kimg", "100", "--tick", "0.016", "--resume", "auto"), quiet=True,
                  stop_after_steps=2)
    assert not any(p.exists() for p in stale) and keep.exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) == list(range(1, 7)), steps


def test_snapshot_is_not_a_training_state_and_names_never_collide(tmp_path):
    _run(tmp_path, "--snap", "0.016", steps=3)  # 32 images per step: snapshots below 1 kimg
    names = sorted(p.name for p in tmp_path.glob("network-snapshot-*.pt"))
    assert names == ["network-snapshot-000000-064.pt", "network-snapshot-000000-096.pt",
                     "network-snapshot-000000.pt"], names  # the first keeps EDM's name
    assert all((tmp_path / (n + ".sha256")).exists() for n in names)
    fake = tmp_path / "training-state-00000099.pt"
    fake.write_bytes((tmp_path / names[0]).read_bytes())
    (tmp_path / "training-state-00000099.pt.sha256").write_text(
        (tmp_path / (names[0] + ".sha256")).read_text())
    assert sorted(p.name for p in tmp_path.glob("samples-*.png")) == [n.replace("network-snapshot", "samples")
                                                                      .replace(".pt", ".png") for n in names]
    with pytest.raises(SystemExit, match="this is a network snapshot, not a training state"):
        _run(tmp_path, "--resume", str(fake), steps=1)


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"just some text\n", "not a readable network snapshot: not a file torch.save wrote (it begins b'just som')"),
    ("truncated", "not a readable network snapshot: a damaged or truncated zip archive"),
    ("pickled class", "GLOBAL argparse.Namespace was not an allowed global by default): it is not plain tensors"),
    ("bare pickle", "an official EDM/FDM snapshot loads under its .pkl name"),
    ("foreign", "not a network snapshot"),
    ("mismatch", "does not match its checksum"),
])
def test_generate_refuses_bad_network_files(tmp_path, capsys, content, message):
    _run(tmp_path / "run", "--snap", "0.016", steps=1)
    snap = next((tmp_path / "run").glob("network-snapshot-*.pt"))
    bad = tmp_path / "bad.pt"
    if content == "truncated":
        bad.write_bytes(snap.read_bytes()[:1000])
    elif content == "pickled class":  # what weights_only=True refuses; torch's text says to retry without it
        torch.save({"ema": {}, "config": argparse.Namespace(a=1)}, bad)
    elif content == "bare pickle":  # as an official EDM/FDM .pkl renamed .pt
        bad.write_bytes(pickle.dumps({"ema": {}}, protocol=4))
    elif content == "foreign":
        torch.save({"weights": torch.zeros(3)}, bad)
    elif content == "mismatch":
        bad.write_bytes(snap.read_bytes())
        (tmp_path / "bad.pt.sha256").write_text("0" * 64 + "  bad.pt\n")
    else:
        bad.write_bytes(content)
    rc = generate.main(["--network", str(bad), "--seeds", "0-1", "--grid", str(tmp_path / "g.png"), "--steps", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "weights_only` set to `False`" not in err  # never the advice to run the file's code
    assert not (tmp_path / "g.png").exists()


@pytest.fixture
def default_signals():
    """SIGINT and SIGTERM as an interactive shell leaves them, restored afterwards: pytest started as a
    background job of a script has SIGINT ignored, and StopRequest leaves an ignored signal ignored."""
    old = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, signal.default_int_handler),
                                                (signal.SIGTERM, signal.SIG_DFL))}
    yield
    for s, h in old.items():
        signal.signal(s, h)


def test_sigint_stops_after_the_step_with_a_training_state_and_resume_is_exact(tmp_path, monkeypatch, capsys,
                                                                                default_signals):
    args = ("--kimg", "0.192", "--ckpt", "100", "--snap", "100")  # 6 steps of 32; no periodic checkpoint
    full = training_loop(tiny_options(tmp_path / "full", *args), quiet=True)
    real_step = train.train_step

    def step_then_ctrl_c(run):
        loss = real_step(run)
        if run.step == 3:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # the copy torchrun forwards at once: ignored
        return loss

    monkeypatch.setattr(train, "train_step", step_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    res = training_loop(tiny_options(run, *args), quiet=True)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    assert res["stopped_by"] == signal.SIGINT and res["step"] == 3 and train.exit_status(res) == 130
    assert [os.path.basename(p) for p in snapshots.checkpoints(str(run))] == ["training-state-00000003.pt"]
    assert "stopped by SIGINT after step 3" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()][-1] == 3
    monkeypatch.setattr(train, "train_step", real_step)
    resumed = training_loop(tiny_options(run, *args, "--resume", "auto"), quiet=True)
    assert resumed["step"] == 6 and resumed["stopped_by"] is None and train.exit_status(resumed) == 0
    for k, v in full["net"].state_dict().items():
        assert torch.equal(v, resumed["net"].state_dict()[k]), k
    for k, v in full["ema"].state_dict().items():
        assert torch.equal(v, resumed["ema"].state_dict()[k]), k


def test_a_later_second_signal_during_the_step_aborts_at_once_and_handlers_are_restored(default_signals):
    before = signal.getsignal(signal.SIGTERM)
    with train.StopRequest(repeat_window_s=0.05) as stop:
        assert stop.requested(1) == 0
        stop.arm()
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # within the window: still stopping gracefully
        time.sleep(0.1)
        with pytest.raises(KeyboardInterrupt, match="aborted"):
            signal.raise_signal(signal.SIGTERM)  # the step is not done: abort
    assert signal.getsignal(signal.SIGTERM) == before
    with train.StopRequest(repeat_window_s=0.05) as stop:
        stop.arm()
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested(2) == signal.SIGTERM and stop.finishing  # the step is done: the state is next
        time.sleep(0.1)
        signal.raise_signal(signal.SIGTERM)  # ignored: aborting now would only lose the state
        signal.raise_signal(signal.SIGINT)
        assert stop.requested(2) == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_while_the_state_is_written_does_not_lose_it(tmp_path, monkeypatch, capfd, default_signals):
    """What torchrun does when a stopping rank exits first: SIGTERM to the ranks still running, one of
    them rank 0 writing the training state, after the repeat window. The write goes on."""
    monkeypatch.setattr(train, "StopRequest", functools.partial(train.StopRequest, repeat_window_s=0.05))
    real_step, real_write = train.train_step, train.write_checkpoint

    def step_then_sigterm(run):
        loss = real_step(run)
        if run.step == 2:
            signal.raise_signal(signal.SIGTERM)
        return loss

    def write_after_sigterm(run):
        time.sleep(0.1)
        signal.raise_signal(signal.SIGTERM)
        return real_write(run)

    monkeypatch.setattr(train, "train_step", step_then_sigterm)
    monkeypatch.setattr(train, "write_checkpoint", write_after_sigterm)
    run = tmp_path / "run"
    res = training_loop(tiny_options(run, "--kimg", "0.192", "--ckpt", "100", "--snap", "100"), quiet=True)
    assert res["stopped_by"] == signal.SIGTERM and res["step"] == 2 and train.exit_status(res) == 143
    assert [os.path.basename(p) for p in snapshots.checkpoints(str(run))] == ["training-state-00000002.pt"]
    err = capfd.readouterr().err
    assert "SIGTERM again: the step is done and the training state is being written" in err, err
    assert "stopped by SIGTERM after step 2" in err, err


def test_an_ignored_signal_stays_ignored(default_signals):
    # a script's background job (the shell sets its SIGINT to SIG_IGN): not ours to catch
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with train.StopRequest() as stop:
        stop.arm()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        signal.raise_signal(signal.SIGINT)
        assert stop.requested(1) == 0
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("step_s, expected, stop_at", [
    (0.05, [1, 2, 12, 22, 32], 42),  # fast steps: one agreement per STOP_SYNC_STEPS (10) steps
    (0.3, [1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35], 38),  # about every STOP_SYNC_S (1 s): every 3 steps
    (2.5, list(range(1, 36)), 36),  # slow steps: after every step, so a stop waits for one step, not ten
])
def test_ranks_agree_on_a_stop_about_every_second_and_on_the_same_steps(monkeypatch, step_s, expected, stop_at):
    """The schedule of the stop agreements with several ranks: the first after the first step, then from
    the slowest rank's measured step time, which comes out of the all-reduce (faked here: the other rank
    is 1.5x slower than this one, and its time must be the one used). A signal the other rank got after
    step 35 reaches this one at the next agreement."""
    now, step, agreed = [100.0], 0, []

    def all_reduce(t, op, group):
        assert op == torch.distributed.ReduceOp.MAX and group == "gloo group" and t.dtype == torch.float64
        t[0] = max(float(t[0]), signal.SIGTERM if step > 35 else 0)  # the other rank's flag
        t[1] = 1.5 * float(t[1])  # the other rank's step time
        agreed.append(step)

    monkeypatch.setattr(torch.distributed, "new_group", lambda backend: f"{backend} group")
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(train.time, "monotonic", lambda: now[0])
    stop = train.StopRequest()
    while True:
        step += 1
        now[0] += step_s / 1.5  # this rank's step; the other rank's (step_s) is slower
        got = stop.requested(step, world=2)
        if got:
            break
        assert step < 60
    assert got == signal.SIGTERM and step == stop_at
    assert agreed == expected + [stop_at], agreed


def test_resume_with_another_config_names_each_difference(tmp_path):
    _run(tmp_path, steps=1)
    o = tiny_options(tmp_path, "--kimg", "100", "--precond", "edm", "--resume", "auto")
    o.network = dict(o.network, model_channels=8)
    with pytest.raises(SystemExit) as e:
        training_loop(o, quiet=True, stop_after_steps=1)
    msg = str(e.value)
    assert "training-state-00000001.pt: the checkpoint's network/precond config differs" in msg, msg
    lines = msg.splitlines()[1:]
    assert lines == ["  network.model_channels: 16 in the checkpoint, 8 in this run",
                     "  precond: 'fdm_edm' in the checkpoint, 'edm' in this run"], msg
    assert list(train.config_differences({"a": {"b": 1}}, {"a": {}, "c": [2]})) == [
        ("a.b", 1, "<absent>"), ("c", "<absent>", [2])]


def test_a_full_disk_stops_the_run_cleanly_and_resume_goes_on(tmp_path, monkeypatch, capsys):
    """torch.save failing half-way (what a full disk or a quota gives): the run ends with a message naming
    the newest checkpoint, exit status 1, no temporary file left, the earlier checkpoint intact."""
    real_save = torch.save
    writes = []

    def full_disk(obj, f, *a, **k):
        if "training-state" in str(f):
            writes.append(f)
            if len(writes) == 2:  # the second checkpoint: some bytes, then the error
                with open(f, "wb") as out:
                    out.write(b"PK\x03\x04" + b"\0" * 4096)
                raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing "
                                   "file data/3: file write failed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(snapshots.torch, "save", full_disk)
    run = tmp_path / "run"
    argv = ["--ds", "digits", "--resolution", "8", "--cbase", "16", "--cres", "1,2", "--batch", "32", "--precision",
            "fp32", "--no-compile", "--kimg", "0.192", "--ckpt", "0.064", "--snap", "100", "--grid", "4",
            "--grid-steps", "2", "--outdir", str(run)]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    first = str(run / "training-state-00000002.pt")
    assert "training-state-00000004.pt: could not be written (" in err and "file write failed" in err, err
    assert f"the newest checkpoint is {first}: make room, then run the same command with --resume auto" in err, err
    assert sorted(p.name for p in run.iterdir() if ".tmp" in p.name or "training-state" in p.name) == [
        "training-state-00000002.pt", "training-state-00000002.pt.sha256"]
    snapshots.verify(first)
    monkeypatch.setattr(snapshots.torch, "save", real_save)
    assert train.main(argv + ["--resume", "auto"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_a_second_run_in_the_same_folder_is_refused_before_it_touches_anything(tmp_path, capsys):
    """Two runs in one --outdir would interleave checkpoints and stats (and the second would delete the
    first's in-flight temporary files as stale). The first holds the folder's lock; the second is refused;
    a holder that is SIGKILLed holds nothing (the kernel drops flock locks with the process)."""
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    in_flight = run / "training-state-00000002.pt.tmp99999"  # the first run's write, in progress
    in_flight.write_bytes(b"x")
    argv = ["--ds", "digits", "--resolution", "8", "--cbase", "16", "--cres", "1,2", "--batch", "32", "--precision",
            "fp32", "--no-compile", "--kimg", "0.064", "--grid", "4", "--grid-steps", "2", "--outdir", str(run)]
    with snapshots.run_lock(str(run)):
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert f"error: {run}: another run is training in this folder (pid {os.getpid()} on " in err, err
        assert in_flight.exists() and not list(run.glob("training-state-*.pt"))
    in_flight.unlink()
    assert train.main(argv) == 0 and list(run.glob("training-state-*.pt"))
    assert not (run / snapshots.LOCK_NAME).exists()  # released and removed
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom fdm_fast.snapshots import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n",
                               str(run)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(snapshots.RunLocked, match=f"pid {holder.pid} on "):
            with snapshots.run_lock(str(run)):
                pass
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with snapshots.run_lock(str(run)):  # the lock file is still there, its lock is not
        assert (run / snapshots.LOCK_NAME).exists()
