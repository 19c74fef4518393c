"""An analytic denoiser: data from an isotropic Gaussian mixture, whose ideal denoiser is known in
closed form. Lets samplers be checked (and NFE studied) without a trained network or a dataset.

Data: y ~ sum_k pi_k N(mu_k, s_k^2 I). With x = y + sigma n, the posterior mean is

    D(x; sigma) = sum_k w_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),
    w_k(x) ∝ pi_k N(x; mu_k, (s_k^2 + sigma^2) I)

``GaussianMixtureDenoiser`` exposes the interface the samplers use (``precond``, ``img_channels``,
``img_resolution``, ``raw(net_in, sigma)``): ``raw`` inverts the preconditioning so that
c_skip x + c_out F equals D exactly, for any of the six preconditionings.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .schedules import Precond, get_precond


class GaussianMixtureDenoiser(torch.nn.Module):
    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor, shape=(1, 2, 2),
                 precond="edm"):
        super().__init__()
        self.register_buffer("means", means.to(torch.float64))  # [K, D]
        self.register_buffer("stds", stds.to(torch.float64))  # [K]
        self.register_buffer("weights", (weights / weights.sum()).to(torch.float64))  # [K]
        self.shape = tuple(shape)
        assert math.prod(self.shape) == self.means.shape[1]
        self.precond: Precond = get_precond(precond) if isinstance(precond, str) else precond
        self.img_channels, self.img_resolution = self.shape[0], self.shape[1]

    @classmethod
    def random(cls, k: int = 4, shape=(1, 2, 2), seed: int = 0, precond="edm", spread: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        d = math.prod(shape)
        means = torch.randn(k, d, generator=g, dtype=torch.float64) * spread
        stds = 0.05 + 0.25 * torch.rand(k, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
        return cls(means, stds, weights, shape, precond)

    def component(self, x: torch.Tensor) -> torch.Tensor:
        """The most likely mixture component of each sample of x [N, ...] (its posterior argmax)."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        d = flat.shape[1]
        logp = (self.weights.log() - d * self.stds.log()
                - torch.cdist(flat, self.means).pow(2) / (2 * self.stds.pow(2)))
        return logp.argmax(dim=1)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """E[y | x] in float64; x [B, C, H, W], sigma float or [B]."""
        B = x.shape[0]
        xf = x.reshape(B, -1).to(torch.float64)
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1) ** 2  # [B or 1, 1]
        var = self.stds[None, :] ** 2 + s2  # [B, K]
        d = xf.shape[1]
        sq = ((xf[:, None, :] - self.means[None]) ** 2).sum(-1)  # [B, K]
        logw = self.weights.log()[None] - 0.5 * sq / var - 0.5 * d * var.log()
        w = torch.softmax(logw, dim=1)
        shrink = (self.stds[None, :] ** 2 / var)[..., None]  # [B, K, 1]
        post = self.means[None] + shrink * (xf[:, None, :] - self.means[None])
        return (w[..., None] * post).sum(1).reshape(x.shape)

    def raw(self, net_in: torch.Tensor, sigma: torch.Tensor, class_labels=None, augment_labels=None) -> torch.Tensor:
        """The 'network output' F with c_skip x + c_out F = D(x), x = net_in / c_in (float64 inside)."""
        s = torch.as_tensor(sigma, dtype=torch.float64, device=net_in.device).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = self.precond.coefficients(s)
        x = net_in.to(torch.float64) / c_in
        F = (self.denoise(x, s.reshape(-1)) - c_skip * x) / c_out
        return F.to(net_in.dtype)

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        return self.denoise(x, sigma)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Exact draws from the mixture (float64)."""
        k = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means.cpu()[k] + self.stds.cpu()[k, None] * z).reshape(n, *self.shape)

    def moments(self):
        """Mean [D] and covariance [D, D] of the mixture."""
        m = (self.weights[:, None] * self.means).sum(0)
        d = self.means.shape[1]
        cov = sum(self.weights[k] * (self.stds[k] ** 2 * torch.eye(d, dtype=torch.float64, device=m.device)
                                     + torch.outer(self.means[k] - m, self.means[k] - m))
                  for k in range(len(self.weights)))
        return m, cov
