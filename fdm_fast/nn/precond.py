"""The preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) of docs/design.md 1.

``Denoiser`` wraps a SongUNet (as ``self.model``, EDM's attribute name, so EDM state dicts map one to
one) with any of the six preconditionings of ``fdm_fast.schedules``. ``forward`` is the official
semantics (float32 in and out, the net in ``dtype``); ``raw`` is the network on an input the fused
ops already scaled, which is how training and sampling call it.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..schedules import Precond, get_precond
from .networks import adm_unet, song_unet


class Denoiser(nn.Module):
    def __init__(self, precond: Precond, model: nn.Module, config: Optional[dict] = None):
        super().__init__()
        self.precond = precond
        self.model = model
        self.config = copy.deepcopy(config or {})

    @property
    def img_resolution(self) -> int:
        return self.config["img_resolution"]

    @property
    def img_channels(self) -> int:
        return self.config["img_channels"]

    @property
    def label_dim(self) -> int:
        return self.config.get("label_dim", 0)

    def raw(self, net_in: torch.Tensor, sigma: torch.Tensor, class_labels=None, augment_labels=None) -> torch.Tensor:
        """F(net_in, c_noise(sigma)): the network on an input already scaled by c_in."""
        c_noise = self.precond.c_noise(sigma.to(torch.float32)).reshape(-1)
        if c_noise.numel() == 1 and net_in.shape[0] > 1:
            c_noise = c_noise.expand(net_in.shape[0])
        return self.model(net_in, c_noise, self._labels(class_labels, net_in), augment_labels)  # c_noise: float32

    def _labels(self, class_labels, x):
        """EDM's preconditioning: a conditional network given no labels sees all-zero labels."""
        if self.label_dim and class_labels is None:
            return torch.zeros(x.shape[0], self.label_dim, device=x.device)
        return class_labels

    def forward(self, x: torch.Tensor, sigma, class_labels=None, augment_labels=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """D(x; sigma) in float32 (EDM's EDMPrecond.forward), the network run in ``dtype``."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma)
        c_noise = c_noise.reshape(-1).expand(x.shape[0]) if c_noise.numel() == 1 else c_noise.reshape(-1)
        F = self.model((c_in * x).to(dtype), c_noise, self._labels(class_labels, x), augment_labels)
        return c_skip * x + c_out * F.to(torch.float32)


def build_denoiser(config: dict) -> Denoiser:
    """A Denoiser from a plain config dict (what snapshots store):

    precond, precond_options, arch, img_resolution, img_channels, label_dim, augment_dim, network (overrides).
    """
    precond = get_precond(config["precond"], **config.get("precond_options", {}))
    make = adm_unet if config["arch"] == "adm" else lambda *a, **k: song_unet(config["arch"], *a, **k)
    model = make(config["img_resolution"], config["img_channels"], label_dim=config.get("label_dim", 0),
                 augment_dim=config.get("augment_dim", 0), **config.get("network", {}))
    return Denoiser(precond, model, config)
