"""Image output shared by train and generate: sample grids as PNG."""

from __future__ import annotations

import math
import os

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
