"""fdm_fast.plots: PNG line plots with Pillow alone (metrics.png in a run folder, the study's figures)."""

import json
import math

from PIL import Image

from fdm_fast.plots import line_plot, read_metric_records, subplots


def _colors(path):
    with Image.open(path) as im:
        return {c for _, c in im.convert("RGB").getcolors(1 << 20)}


def test_line_plot_draws_series_bands_and_skips_missing_points(tmp_path):
    path = str(tmp_path / "p.png")
    series = [dict(x=[1, 2, 4, 8], y=[9.0, 5.0, None, 2.0], lo=[8, 4, None, 1], hi=[10, 6, None, 3], label="a"),
              dict(x=[1, 2, 4, 8], y=[7.0, math.nan, 3.0, 1.5], label="b", color=1)]
    assert line_plot(path, series, title="t", xlabel="kimg", ylabel="FD", logx=True, logy=True) == path
    with Image.open(path) as im:
        assert im.size == (720, 440) and im.format == "PNG"
    colors = _colors(path)
    assert (31, 119, 180) in colors and (214, 39, 40) in colors  # both series' colors are drawn
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left behind


def test_subplots_and_metric_records(tmp_path):
    path = str(tmp_path / "s.png")
    panel = dict(series=[dict(x=[0, 1], y=[1, 0], label="x")], title="p")
    subplots(path, [panel, panel, panel], cols=2)
    with Image.open(path) as im:
        assert im.size == (1440, 880)
    stats = tmp_path / "stats.jsonl"
    stats.write_text("\n".join([json.dumps(dict(kimg=1, step=1, loss=2.0)),
                                json.dumps(dict(kimg=1, step=1, metric="digits-fd", fd=3.0)),
                                '{"torn', json.dumps(dict(kimg=2, step=2, metric="fid", fid=1.0))]) + "\n")
    assert [r["fd"] for r in read_metric_records(str(stats), "digits-fd")] == [3.0]
    assert len(read_metric_records(str(stats))) == 2
    assert read_metric_records(str(tmp_path / "none.jsonl")) == []


def test_training_plot_of_a_run_folder(tmp_path):
    from fdm_fast.plots import read_tick_records
    from fdm_fast.train import plot_training

    assert plot_training(str(tmp_path), "fdm_edm") is None  # no stats yet: nothing drawn
    stats = tmp_path / "stats.jsonl"
    stats.write_text("\n".join([json.dumps(dict(kimg=0.5 * k, step=k, loss=10.0 / (k + 1), img_per_s=100.0 + k))
                                for k in range(1, 6)]
                               + [json.dumps(dict(kimg=2.5, step=5, metric="digits-fd", fd=3.0)), '{"torn']) + "\n")
    assert [r["step"] for r in read_tick_records(str(stats))] == [1, 2, 3, 4, 5]
    path = plot_training(str(tmp_path), "fdm_edm")
    with Image.open(path) as im:
        assert path == str(tmp_path / "training.png") and im.size == (1440, 440)
    colors = _colors(path)
    assert (31, 119, 180) in colors and (44, 160, 44) in colors  # the loss and the speed lines
