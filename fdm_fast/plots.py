"""Line plots as PNG with Pillow alone (a dependency already): a run folder's training.png (loss and
speed) and metrics.png (quality vs kimg), and the study's figures, on machines without matplotlib.
Lines, optional shaded bands (confidence intervals), markers, a legend and labelled axes; linear or
log axes."""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + k * step for k in range(int((hi - start) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks of a log axis (lo, hi in log10 units), in log10 units: at 1, 2 and 5 times powers of ten, or
    at every integer multiple for a range of less than a decade, else at round values of the range."""
    for mults in ((1, 2, 5), range(1, 10)):
        out = [math.log10(m * 10.0 ** k) for k in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in mults]
        out = [t for t in out if lo - 1e-9 <= t <= hi + 1e-9]
        if len(out) >= 2:
            return out
    return [math.log10(v) for v in _ticks(10 ** lo, 10 ** hi) if v > 0]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.0e}"
    return f"{v:.3g}"


def line_plot(path: str, series: Sequence[dict], *, title: str = "", xlabel: str = "", ylabel: str = "",
              logx: bool = False, logy: bool = False, size=(720, 440)) -> str:
    """Write a PNG of ``series`` (dicts with ``x``, ``y``, ``label`` and optional ``lo``/``hi`` band
    bounds, ``color`` index and ``dashed``; a series without a label has no legend entry) to ``path``
    (atomically); returns the path."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    left, right, top, bottom = 70, 20, 34 if title else 14, 48
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img, "RGBA")
    font = ImageFont.load_default()

    def tx(v):
        return math.log10(v) if logx else v

    def ty(v):
        return math.log10(v) if logy else v

    pts = [(tx(x), ty(y)) for s in series for x, y in zip(s["x"], s["y"])
           if y is not None and math.isfinite(y) and (not logx or x > 0) and (not logy or y > 0)]
    for s in series:
        for key in ("lo", "hi"):
            for x, y in zip(s["x"], s.get(key) or []):
                if y is not None and math.isfinite(y) and (not logy or y > 0):
                    pts.append((tx(x), ty(y)))
    if not pts:
        pts = [(0.0, 0.0), (1.0, 1.0)]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))

    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for t in (_log_ticks(x0, x1) if logx else _ticks(x0, x1)):
        X, _ = px(t, y0)
        d.line([X, H - bottom, X, H - bottom + 4], fill=(0, 0, 0))
        d.line([X, top, X, H - bottom], fill=(0, 0, 0, 25))
        label = _fmt(10 ** t if logx else t)
        d.text((X - 3 * len(label), H - bottom + 6), label, fill=(0, 0, 0), font=font)
    for t in (_log_ticks(y0, y1) if logy else _ticks(y0, y1)):
        _, Y = px(x0, t)
        d.line([left - 4, Y, left, Y], fill=(0, 0, 0))
        d.line([left, Y, W - right, Y], fill=(0, 0, 0, 25))
        label = _fmt(10 ** t if logy else t)
        d.text((left - 8 - 6 * len(label), Y - 6), label, fill=(0, 0, 0), font=font)
    if title:
        d.text((left, 10), title, fill=(0, 0, 0), font=font)
    if xlabel:
        d.text(((left + W - right) / 2 - 3 * len(xlabel), H - 20), xlabel, fill=(0, 0, 0), font=font)
    if ylabel:
        d.text((6, top - 14 if title else 2), ylabel, fill=(0, 0, 0), font=font)

    entries = 0
    for k, s in enumerate(series):
        color = COLORS[s.get("color", k) % len(COLORS)]
        xs = list(s["x"])
        if s.get("lo") is not None and s.get("hi") is not None:
            band = [(x, lo, hi) for x, lo, hi in zip(xs, s["lo"], s["hi"])
                    if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)]
            if len(band) >= 2:
                poly = [px(tx(x), ty(hi)) for x, _, hi in band] + [px(tx(x), ty(lo)) for x, lo, _ in reversed(band)]
                d.polygon(poly, fill=color + (50,))
        line = [px(tx(x), ty(y)) for x, y in zip(xs, s["y"]) if y is not None and math.isfinite(y)]
        if s.get("dashed"):
            for (ax, ay), (bx, by) in zip(line, line[1:]):
                n = max(1, int(math.hypot(bx - ax, by - ay) / 8))  # 8-pixel periods, half of each drawn
                for i in range(n):
                    f0, f1 = i / n, (i + 0.5) / n
                    d.line([ax + f0 * (bx - ax), ay + f0 * (by - ay), ax + f1 * (bx - ax), ay + f1 * (by - ay)],
                           fill=color, width=1)
        elif len(line) >= 2:
            d.line(line, fill=color, width=2)
        for X, Y in line:
            r = 1.5 if s.get("dashed") else 2.5
            d.ellipse([X - r, Y - r, X + r, Y + r], fill=color)
        if s.get("label"):  # legend, top right
            ly = top + 8 + 14 * entries
            entries += 1
            d.line([W - right - 150, ly + 6, W - right - 130, ly + 6], fill=color, width=3)
            d.text((W - right - 125, ly), str(s["label"])[:22], fill=(0, 0, 0), font=font)
    tmp = f"{path}.tmp{os.getpid()}.png"
    img.save(tmp)
    os.replace(tmp, path)
    return path


def subplots(path: str, panels: Sequence[dict], *, cols: int = 2, size=(720, 440)) -> str:
    """Several line_plot panels (each a dict of line_plot's keyword arguments plus ``series``) in one PNG."""
    from PIL import Image

    rows = math.ceil(len(panels) / cols)
    out = Image.new("RGB", (size[0] * min(cols, len(panels)), size[1] * rows), "white")
    tmp_paths = []
    for k, panel in enumerate(panels):
        tmp = f"{path}.panel{k}.tmp{os.getpid()}.png"
        panel = dict(panel)
        line_plot(tmp, panel.pop("series"), size=size, **panel)
        tmp_paths.append(tmp)
        with Image.open(tmp) as im:
            out.paste(im, ((k % cols) * size[0], (k // cols) * size[1]))
    for t in tmp_paths:
        os.remove(t)
    tmp = f"{path}.tmp{os.getpid()}.png"
    out.save(tmp)
    os.replace(tmp, path)
    return path


def _records(stats_path: str) -> list[dict]:
    """Every JSON object of a run's stats.jsonl, in file order (a torn line skipped)."""
    import json

    out = []
    if not os.path.isfile(stats_path):
        return out
    with open(stats_path) as f:
        lines = f.readlines()
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_metric_records(stats_path: str, metric: Optional[str] = None) -> list[dict]:
    """The metric records of a run's stats.jsonl (those with a ``metric`` key), in file order."""
    return [r for r in _records(stats_path) if "metric" in r and (metric is None or r["metric"] == metric)]


def read_tick_records(stats_path: str) -> list[dict]:
    """The progress records of a run's stats.jsonl (one per tick: kimg, loss, img_per_s, ...), in file order."""
    return [r for r in _records(stats_path) if "metric" not in r and "loss" in r and "kimg" in r]
