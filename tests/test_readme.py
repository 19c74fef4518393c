"""Every ```python block of README.md runs as written, so the documented API cannot drift from the code.

Blocks that load the main job's run folder (runs/digits-fdm_edm-ddpmpp) find a tiny untrained network
of the same image shape there; what a block prints is not checked, only that it runs and, for the
blocks that sample, that the images have the shape the comment gives.
"""

import re
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_snapshot

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    """(first line number, code) of each ```python block."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)]


BLOCKS = python_blocks()


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(BLOCKS) >= 3, BLOCKS  # the ops, sampling and digits-metric examples at least


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FDM_FAST_CACHE", str(tmp_path / "cache"))  # the digits classifier, trained fresh
    run = tmp_path / "runs" / "digits-fdm_edm-ddpmpp"
    run.mkdir(parents=True)
    tiny_snapshot(run / "network-snapshot-000001.pt", resolution=16)  # the main job's images: 1 x 16 x 16
    ns = {"__name__": "__readme__"}
    with warnings.catch_warnings():  # the stand-in snapshot has no checksum file beside it (made here)
        warnings.filterwarnings("ignore", message=".*no checksum file.*")
        exec(compile(code, f"{README}:{line}", "exec"), ns)
    for name in ("x", "images"):  # what the sampling blocks make
        if "solvers.sample" in code and isinstance(ns.get(name), torch.Tensor):
            assert ns[name].dtype == torch.float32 and tuple(ns[name].shape[1:]) == (1, 16, 16)
            assert torch.isfinite(ns[name]).all()

