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


def test_dashed_and_unlabelled_series_and_log_ticks_within_a_decade(tmp_path):
    from fdm_fast.plots import _log_ticks

    # less than a decade: every integer multiple (before: the fallback put ticks at 5.01, 6.31, 7.94)
    assert [round(10 ** t, 9) for t in _log_ticks(math.log10(5), math.log10(9))] == [5, 6, 7, 8, 9]
    assert [round(10 ** t, 9) for t in _log_ticks(0, 2)] == [1, 2, 5, 10, 20, 50, 100]
    path = str(tmp_path / "d.png")
    line_plot(path, [dict(x=[1, 9], y=[2, 2], label="solid"), dict(x=[1, 9], y=[1, 1], color=1, dashed=True)])
    with Image.open(path) as im:
        px = im.convert("RGB").load()
        W, H = im.size
    red = (214, 39, 40)
    row = max(range(H), key=lambda y: sum(px[x, y] == red for x in range(W)))
    xs = [x for x in range(W) if px[x, row] == red]
    assert len(xs) > 100 and len(xs) < 0.8 * (xs[-1] - xs[0] + 1)  # a long line with gaps: dashed
    legend = {px[x, y] for x in range(W - 175, W - 140) for y in range(30, 80)}
    assert (31, 119, 180) in legend and red not in legend  # the unlabelled series has no legend entry


def test_sampler_speed_plot_draws_both_panels_without_matplotlib(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sampler_speed

    rows = [dict(kind="speed", variant=v, batch=8, nfe=n, img_per_s=s * n) for v, s in (("official", 1.0),
                                                                                        ("fused", 2.0))
            for n in (5, 9)]
    rows += [dict(kind="nfe", sampler=s, nfe=n, median_err=e / n, p90_err=3 * e / n) for s, e in (("euler", 1.0),
                                                                                                  ("heun", 0.5))
             for n in (5, 9, 17)]
    path = sampler_speed.plot(rows, str(tmp_path / "s.png"))
    with Image.open(path) as im:
        assert im.size == (1440, 440)
    colors = _colors(path)
    assert (31, 119, 180) in colors and (214, 39, 40) in colors  # the first two series of each panel
    assert sampler_speed.plot([dict(kind="overhead")], str(tmp_path / "none.png")) is None
