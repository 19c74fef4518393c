"""The benchmark scripts, run as a user would with tiny settings: they print tables with headers and
leave the checkout exactly as it was unless asked to write (--results, --json, --out)."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_snapshot

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "ops_bandwidth.py": ["--sizes", "b64", "--dtypes", "fp32", "--ops", "perturb", "perturb+loss", "--no-compile",
                         "--reps", "2"],
    # batch 8: on a CPU without bf16 kernels (AVX2) the bf16 rows run emulated, ~10x the fp32 step's time
    "train_throughput.py": ["--steps", "1", "--warmup", "1", "--no-compile", "--batch", "8"],
    "sampler_speed.py": ["--speed-nfe", "3", "--nfe", "5", "--nfe-samples", "20", "--reps", "1"],
    "fdm_claims.py": ["--quick"],
}
# the run asked to write: the same, but fdm_claims trains only E1's EDM pair (its two other experiments
# write through the same code, and the default run above already ran them)
RUNS_WRITING = dict(RUNS, **{"fdm_claims.py": ["--quick", "--experiments", "E1", "--arms", "edm"],
                             "sampler_speed.py": [*RUNS["sampler_speed.py"], "--no-compile"]})
HEADERS = {"ops_bandwidth.py": "% copy BW", "train_throughput.py": "vs row above", "sampler_speed.py": "ms/NFE",
           "fdm_claims.py": "speed-up (baseline kimg / that)"}


def _status():
    r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                       text=True)
    return r.stdout if r.returncode == 0 else None


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_prints_headers_and_writes_nothing_by_default(script, tmp_path):
    before = _status()
    if before is None:
        pytest.skip("not a git checkout: cannot tell whether the tree changed")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *RUNS[script]], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert HEADERS[script] in r.stdout, r.stdout[-2000:]
    r_default_out = r.stdout
    assert _status() == before, f"{script} changed the checkout:\n{_status()}"
    # asked to write, it writes where it was told
    out = tmp_path / "rows.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *RUNS_WRITING[script], "--results",
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and out.read_text().count("| ") > 3, r.stderr[-2000:]
    assert _status() == before
    if script == "sampler_speed.py":  # the second run's --no-compile leaves the compiled variant out
        assert "fused+compile" in r_default_out and "fused+compile" not in out.read_text()


def test_time_budget_skips_late_rows_and_keeps_the_timed_ones():
    # a benchmark near its stage's hard limit reports fewer rounds or skipped rows instead of losing the table
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import time

    import torch
    from _harness import deadline_after, time_interleaved

    calls = {"a": 0, "slow": 0, "late": 0}

    def fn(k, s):
        def call():
            calls[k] += 1
            time.sleep(s)
        return call

    info = {}
    timed = time_interleaved({"a": fn("a", 0.01), "slow": fn("slow", 0.3), "late": fn("late", 0.01)},
                             torch.device("cpu"), reps=50, warmup=3, deadline=deadline_after(0.2), info=info)
    assert set(timed) == {"a", "slow"} and calls["late"] == 0  # "late" would have started after the deadline
    assert info["rounds"] == 1 and calls["a"] == 2 and calls["slow"] == 2  # first call + one timed round
    assert 0.25 < timed["slow"][0] < 1.0 and timed["slow"][1] > 0.25
    # without a deadline every round runs
    timed = time_interleaved({"a": fn("a", 0.0)}, torch.device("cpu"), reps=4, warmup=1, info=info)
    assert info["rounds"] == 4


@pytest.mark.parametrize("compile", [True, False])
def test_train_throughput_rows_add_one_change_each(compile):
    """Each ablation row is the row above plus one change; with --no-compile no row compiles (the rows
    after the skipped compile row once kept its flag, so "+ fused ops" measured compile and fused ops)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_throughput import STEPS, ablation_rows

    rows = list(ablation_rows(compile).values())
    assert rows[0] == set() and len(rows) == len(STEPS) + 1 - (not compile)
    for above, row in zip(rows, rows[1:]):
        assert above < row and len(row - above) == 1
    assert any("compile" in r for r in rows) == compile


@pytest.mark.slow
def test_guidance_study_runs_on_a_conditional_snapshot(tmp_path):
    import json

    snap = tiny_snapshot(tmp_path / "cond.pt", 16, label_dim=10, label_dropout=0.1)
    out, js = tmp_path / "rows.md", tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "guidance_study.py"), "--network", str(snap),
                        "--guide-network", str(snap), "--weights", "0", "1", "2", "--num", "20", "--steps", "3",
                        "--results", str(out), "--json", str(js)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(js.read_text())["rows"]
    assert [(x["kind"], x["w"]) for x in rows] == [("classifier-free", 0.0), ("classifier-free", 1.0),
                                                  ("classifier-free", 2.0), ("autoguidance", 1.0),
                                                  ("autoguidance", 2.0)]
    # a guide equal to the main network changes nothing, whatever w (up to float rounding of the combination)
    assert abs(rows[4]["fd"] - rows[1]["fd"]) <= 1e-3 * rows[1]["fd"] and rows[4]["label_accuracy"] == rows[1]["label_accuracy"]
    assert "label accuracy" in out.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_ops_bandwidth_steady_heap_removes_most_page_faults():
    """On a CPU ops_bandwidth keeps freed blocks in glibc's heap (--malloc steady) and reports the page
    faults per timed call: with glibc's defaults fresh outputs of a few MB fault page by page."""
    faults = {}
    for mode in ("default", "steady"):
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ops_bandwidth.py"), "--ops", "euler", "--sizes",
                            "b64", "--dtypes", "fp32", "--no-compile", "--reps", "2", "--malloc", mode],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith("Page faults per call"))
        faults[mode] = float(line.split("worst row:")[1].split()[0])
        if mode == "steady" and "mallopt refused" in r.stdout:
            pytest.skip("this glibc refused the thresholds")
    assert faults["default"] > 100, faults  # the effect is there without it (427-966 in four runs here)
    assert faults["steady"] < faults["default"] / 5, faults  # 13-18 with it


def test_ops_bandwidth_time_budget_writes_what_it_measured_and_names_the_rest(tmp_path, monkeypatch):
    """gpu_check.sh gives ops_bandwidth a stage limit: once its budget is spent it starts no new group, and
    the table, JSON and notes keep the groups it measured and name those it did not (without the budget a
    killed run loses the whole table). A clock that jumps past the deadline after the first group stands in
    for a slow compile."""
    import json
    import time
    import types

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ops_bandwidth as ob

    spent = {"now": False}
    real_interleaved = ob.time_interleaved

    def interleaved(*a, **kw):
        try:
            return real_interleaved(*a, **kw)
        finally:
            spent["now"] = True  # the budget runs out during the first group

    monkeypatch.setattr(ob, "time_interleaved", interleaved)
    monkeypatch.setattr(ob, "time", types.SimpleNamespace(
        perf_counter=lambda: float("inf") if spent["now"] else time.perf_counter()))
    out, res = tmp_path / "ops.json", tmp_path / "rows.md"
    checks = ob.ops.set_value_checks(True)  # main() turns them off for timing: give this process back its own
    try:
        ob.main(["--ops", "perturb", "euler", "--sizes", "b64", "--dtypes", "fp32", "--no-compile", "--reps", "1",
                 "--malloc", "default", "--backends", "--time-budget", "600", "--json", str(out), "--results",
                 str(res)])
    finally:
        ob.ops.set_value_checks(checks)
    d = json.loads(out.read_text())
    assert [(r["op"], r["impl"]) for r in d["rows"]] == [("perturb", "eager"), ("perturb", "copy")]
    assert d["left_out"] == ["euler step 64x3x64x64 fp32 (all)"]
    text = res.read_text()
    assert "Not measured within --time-budget 600 s: euler step 64x3x64x64 fp32 (all)" in text
    with pytest.raises(SystemExit):  # a budget that is no budget is refused by name
        ob.main(["--time-budget", "0"])


def test_write_json_replaces_the_file_whole(tmp_path, monkeypatch):
    """A benchmark's JSON goes to a temporary name and is renamed: a write that fails half-way (disk
    full, a kill) leaves the previous file as it was, and no temporary file beside it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import json

    from _harness import write_json

    path = tmp_path / "r.json"
    write_json(path, dict(rows=[1, 2]))
    assert json.loads(path.read_text()) == dict(rows=[1, 2])

    def half_then_fail(self, text, *a, **k):
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError):
        write_json(path, dict(rows=list(range(100))))
    monkeypatch.undo()
    assert json.loads(path.read_text()) == dict(rows=[1, 2])
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
