"""Image output shared by train and generate: sample grids as PNG, and the record of what made a folder
of generate's images (read by fid)."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch


def save_grid(images: torch.Tensor, path: str) -> None:
    """A square-ish PNG grid of images in [-1, 1] (written atomically)."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    pad = max(1, h // 16)  # a gray line between images
    x = (images.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu()
    grid = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 128, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top:top + h, left:left + w] = x[k]
    arr = grid.permute(1, 2, 0).numpy()
    im = Image.fromarray(arr[:, :, 0] if c == 1 else arr, "L" if c == 1 else "RGB")
    scale = max(1, 256 // max(h, 1))  # small images are hard to see: enlarge
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    tmp = path + ".tmp.png"
    im.save(tmp)
    os.replace(tmp, path)


SETTINGS_FILE = "generate.json"  # in a folder of generate's images: the settings that made them


def read_image_settings(folder: str) -> Optional[dict]:
    """The settings recorded in ``folder``'s generate.json, or None when it has none. An unreadable record
    raises (OSError, ValueError, KeyError, TypeError); the caller decides what that means (and meets an
    AttributeError when the record is not a mapping)."""
    path = os.path.join(folder, SETTINGS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["settings"]


def write_image_settings(folder: str, settings: dict) -> None:
    """Write ``folder``/generate.json (under a temporary name, then renamed)."""
    path = os.path.join(folder, SETTINGS_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(dict(settings=settings, written_by="python -m fdm_fast.generate"), f, indent=2)
    os.replace(tmp, path)
