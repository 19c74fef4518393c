"""Non-leaky geometric augmentation, EDM's ``AugmentPipe`` scheme (Karras et al. 2020, 2022).

Each image is, with probability p per transform: x-flipped, y-flipped, isotropically scaled,
rotated by a fraction of a turn, anisotropically scaled, and translated by a fraction of its size;
the general transforms are done at 2x resolution through the sym6 wavelet and ``grid_sample`` with
reflection padding, as EDM does. The transform parameters come back as 9 augmentation labels per
image, which the network is conditioned on (``augment_dim = 9``) and which are zero at sampling
time, so the augmentations do not leak into the generated distribution.

Randomness: every parameter is a function of per-image uniforms ``u`` [N, 15] that the caller
provides (``fdm_fast.loss.sample_uniforms``), so an image's augmentation depends on its own key only
(exact resume, rank-invariant).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as nnf

# sym6 scaling filter (orthonormal: sums to sqrt(2), unit norm, orthogonal to its even shifts).
SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
        0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
        0.0017677118642428036, -0.007800708325034148]

NUM_UNIFORMS = 15
AUGMENT_DIM = 9


def _mat(*rows, device):
    """[N, 3, 3] (or [3, 3]) from rows of scalars / [N] tensors."""
    ref = next((v for r in rows for v in r if isinstance(v, torch.Tensor)), None)
    shape = ref.shape if ref is not None else ()
    out = torch.empty(*shape, len(rows), len(rows[0]), dtype=torch.float32, device=device)
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            out[..., i, j] = v
    return out


def translate2d(tx, ty, device):
    return _mat([1, 0, tx], [0, 1, ty], [0, 0, 1], device=device)


def scale2d(sx, sy, device):
    return _mat([sx, 0, 0], [0, sy, 0], [0, 0, 1], device=device)


def rotate2d(theta, device):
    return _mat([torch.cos(theta), torch.sin(-theta), 0], [torch.sin(theta), torch.cos(theta), 0], [0, 0, 1],
                device=device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without a sync: a pinned, asynchronous copy from the host to a GPU."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=True)


def _normal(u):
    return math.sqrt(2) * torch.special.erfinv(2 * u.clamp(1e-7, 1 - 1e-7) - 1)


_WAVELETS: dict = {}


def _wavelet(hz, dtype, device) -> torch.Tensor:
    """The sym6 filter as a [1, 1, K] tensor on ``device``, made once per (order, dtype, device)."""
    key = (float(hz[0]), dtype, device)
    if key not in _WAVELETS:
        _WAVELETS[key] = torch.as_tensor(np.ascontiguousarray(hz)[None, None, :], dtype=dtype, device=device)
    return _WAVELETS[key]


class AugmentPipe:
    """EDM's geometric AugmentPipe with its training settings (xflip=1e8, yflip=1, scale=1, rotate_frac=1,
    aniso=1, translate_frac=1) at overall probability ``p``."""

    def __init__(self, p: float, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
                 scale_std=0.2, rotate_frac_max=1, aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125):
        if not 0 <= p <= 1:
            raise ValueError(f"augment p: expected a probability in [0, 1], got {p}")
        self.p = p
        self.xflip, self.yflip, self.scale, self.rotate_frac = xflip, yflip, scale, rotate_frac
        self.aniso, self.translate_frac = aniso, translate_frac
        self.scale_std, self.rotate_frac_max, self.aniso_std = scale_std, rotate_frac_max, aniso_std
        self.aniso_rotate_prob, self.translate_frac_std = aniso_rotate_prob, translate_frac_std

    def __call__(self, images: torch.Tensor, u: torch.Tensor):
        """(augmented images, labels [N, 9]) for images [N, C, H, W] (float) and uniforms u [N, 15].

        The [N, 3, 3] matrices, the labels and the padding margin are computed where ``u`` lives (pass
        host uniforms when the images are on a GPU: the margin, a data-dependent size, is then read on
        the host, not synced from the device); only the final matrix and the labels are copied to the
        images' device, asynchronously.
        """
        N, C, H, W = images.shape
        img_dev = images.device
        dev = u.device
        u = u.to(dtype=torch.float32)
        if u.shape != (N, NUM_UNIFORMS):
            raise ValueError(f"u: expected uniforms of shape ({N}, {NUM_UNIFORMS}), got {tuple(u.shape)}")
        zero = torch.zeros(N, device=dev)
        labels = []

        # Pixel blitting: flips.
        w = torch.where(u[:, 1] < self.xflip * self.p, (u[:, 0] < 0.5).float(), zero)
        images = torch.where(to_device(w, img_dev).reshape(-1, 1, 1, 1) == 1, images.flip(3), images)
        labels.append(w)
        w = torch.where(u[:, 3] < self.yflip * self.p, (u[:, 2] < 0.5).float(), zero)
        images = torch.where(to_device(w, img_dev).reshape(-1, 1, 1, 1) == 1, images.flip(2), images)
        labels.append(w)

        # General transformations, as an inverse matrix G_inv [N, 3, 3].
        I3 = torch.eye(3, device=dev).expand(N, 3, 3)
        G_inv = I3
        w = torch.where(u[:, 5] < self.scale * self.p, _normal(u[:, 4]), zero)
        s = (w * self.scale_std).exp2()
        G_inv = G_inv @ scale2d(1 / s, 1 / s, dev)
        labels.append(w)
        w = torch.where(u[:, 7] < self.rotate_frac * self.p, (u[:, 6] * 2 - 1) * (math.pi * self.rotate_frac_max), zero)
        G_inv = G_inv @ rotate2d(w, dev)  # rotate2d_inv(-w) = rotate2d(w)
        labels += [w.cos() - 1, w.sin()]
        w = torch.where(u[:, 10] < self.aniso * self.p, _normal(u[:, 8]), zero)
        r = torch.where(u[:, 11] < self.aniso_rotate_prob, (u[:, 9] * 2 - 1) * math.pi, zero)
        s = (w * self.aniso_std).exp2()
        G_inv = G_inv @ rotate2d(-r, dev) @ scale2d(1 / s, s, dev) @ rotate2d(r, dev)
        labels += [w * r.cos(), w * r.sin()]
        on = u[:, 14] < self.translate_frac * self.p
        tx = torch.where(on, _normal(u[:, 12]), zero)
        ty = torch.where(on, _normal(u[:, 13]), zero)
        G_inv = G_inv @ translate2d(-tx * W * self.translate_frac_std, -ty * H * self.translate_frac_std, dev)
        labels += [tx, ty]

        if self.p > 0:
            images = self._transform(images, G_inv)
        return images, to_device(torch.stack(labels, dim=1), img_dev)

    @staticmethod
    def _transform(images, G_inv):
        N, C, H, W = images.shape
        img_dev, dev = images.device, G_inv.device
        cx, cy = (W - 1) / 2, (H - 1) / 2
        cp = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], dtype=torch.float32, device=dev)
        cp = G_inv @ cp.t()  # [N, xyz, corner]
        Hz = np.asarray(SYM6, dtype=np.float32)
        Hz_pad = len(Hz) // 4
        margin = cp[:, :2, :].permute(1, 0, 2).flatten(1)
        margin = torch.cat([-margin, margin]).max(dim=1).values
        margin = margin + torch.tensor([Hz_pad * 2 - cx, Hz_pad * 2 - cy] * 2, device=dev)
        margin = margin.max(torch.zeros(4, device=dev)).min(torch.tensor([W - 1, H - 1] * 2, dtype=torch.float32,
                                                                           device=dev))
        mx0, my0, mx1, my1 = (int(v) for v in margin.ceil().to(torch.int32))

        images = nnf.pad(images, pad=[mx0, mx1, my0, my1], mode="reflect")
        G_inv = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2, dev) @ G_inv

        # Upsample 2x with the wavelet.
        wt = _wavelet(Hz[::-1], images.dtype, img_dev).tile([C, 1, 1])
        pad = (len(Hz) + 1) // 2
        images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
        images = nnf.conv2d(images, wt.unsqueeze(2), groups=C, padding=[0, pad])
        images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
        images = nnf.conv2d(images, wt.unsqueeze(3), groups=C, padding=[pad, 0])
        G_inv = scale2d(2, 2, dev) @ G_inv @ scale2d(0.5, 0.5, dev)
        G_inv = translate2d(-0.5, -0.5, dev) @ G_inv @ translate2d(0.5, 0.5, dev)

        # Resample.
        shape = [N, C, (H + Hz_pad * 2) * 2, (W + Hz_pad * 2) * 2]
        G_inv = (scale2d(2 / images.shape[3], 2 / images.shape[2], dev) @ G_inv
                 @ scale2d(shape[3] / 2, shape[2] / 2, dev))
        grid = nnf.affine_grid(theta=to_device(G_inv[:, :2, :].contiguous(), img_dev), size=shape, align_corners=False)
        images = nnf.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        # Downsample 2x and crop.
        wt = _wavelet(Hz, images.dtype, img_dev).tile([C, 1, 1])
        pad = (len(Hz) - 1) // 2
        images = nnf.conv2d(images, wt.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, pad])[:, :, :, Hz_pad:-Hz_pad]
        images = nnf.conv2d(images, wt.unsqueeze(3), groups=C, stride=[2, 1], padding=[pad, 0])[:, :, Hz_pad:-Hz_pad, :]
        return images
