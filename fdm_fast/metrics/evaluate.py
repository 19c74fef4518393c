"""Sample quality of a network: a fixed seed set sampled at a fixed NFE, scored by a metric. The same
network gives the same images and the same numbers, so points along a training run compare.

    ev = SampleEvaluator("digits-fd", num=500, steps=9, device=device)
    ev(ema)   # {"fd": ..., "kid": ..., "precision": ..., ..., "nfe": 17, "num": 500, "seconds": ...}

Metrics:
  digits-fd  16x16 grayscale digits (``--ds digits``): Fréchet distance on the features of the
             project's digits classifier (fdm_fast.metrics.digits), with KID, precision/recall, class
             coverage and pixel FD. Primary value: ``fd``.
  fid        any RGB or grayscale data: FID on torch-fidelity's Inception-v3 features against reference
             statistics (``python -m fdm_fast.fid ref``); needs the Inception weights file and the
             reference .npz. Primary value: ``fid``.

Evaluation draws no random numbers from torch's generators (the samplers' noise is counter-based,
keyed by the seeds), and runs under ``torch.random.fork_rng`` besides, so a training run that
evaluates follows the same trajectory as one that does not (tests/test_train.py).
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from . import MetricError, frechet_distance, load_ref, statistics

METRICS = {"digits-fd": "fd", "fid": "fid"}  # name -> primary value


def check_metric(name: str, *, resolution: int, channels: int, inception: Optional[str] = None,
                 ref: Optional[str] = None) -> None:
    """Raise MetricError (naming the option) when ``name`` cannot score this data: call it before training."""
    if name not in METRICS:
        raise MetricError(f"--metric: expected one of {', '.join(METRICS)}, got {name!r}")
    if name == "digits-fd" and (resolution, channels) != (16, 1):
        raise MetricError(f"--metric digits-fd: scores 16x16 grayscale digits (--ds digits); this data is "
                          f"{resolution}x{resolution}x{channels}: use --metric fid")
    if name == "fid":
        from .inception import FIDError, inception_weights

        if not ref:
            raise MetricError("--metric fid: needs --ref, the dataset's reference statistics "
                              "(python -m fdm_fast.fid ref --data DATA --dest REF.npz)")
        try:
            load_ref(ref)
            inception_weights(inception)
            import torch_fidelity  # noqa: F401
        except FIDError as e:
            raise MetricError(f"--metric fid: {e}") from None
        except ImportError as e:
            raise MetricError(f"--metric fid: torch-fidelity is not importable ({e}); pip install torch-fidelity "
                              "and a torchvision that matches your torch") from None


class SampleEvaluator:
    """Scores a denoiser's samples of seeds ``0..num-1`` (labels cycling over the classes for a
    conditional network) drawn with the deterministic Heun sampler in ``steps`` steps (NFE 2*steps-1)."""

    def __init__(self, name: str, *, num: int = 500, steps: int = 9, batch: int = 250, device="cpu",
                 inception: Optional[str] = None, ref: Optional[str] = None, sampler: str = "heun",
                 scorer=None, log=lambda *a: None, schedule: str = "edm", afs: bool = False):
        if name not in METRICS:
            raise MetricError(f"metric: expected one of {', '.join(METRICS)}, got {name!r}")
        if num < 2 or steps < 1 or batch < 1:
            raise MetricError(f"num >= 2, steps >= 1 and batch >= 1 expected, got {num}, {steps}, {batch}")
        from .. import solvers

        self.name, self.num, self.steps, self.batch, self.sampler = name, num, steps, batch, sampler
        self.solver = {"dpm2m": "dpm++2m"}.get(sampler, sampler)  # the solvers' name for it
        self.schedule, self.afs = schedule, bool(afs)
        self.device = torch.device(device)
        self.primary = METRICS[name]
        if sampler not in ("dpm2m", *solvers.SOLVERS):
            raise MetricError(f"sampler: expected dpm2m or one of {', '.join(solvers.SOLVERS)}, got {sampler!r}")
        if schedule not in solvers.SCHEDULES:
            raise MetricError(f"schedule: expected one of {', '.join(solvers.SCHEDULES)}, got {schedule!r}")
        try:
            solvers.check_options(self.solver, steps, schedule, afs=self.afs)
        except ValueError as e:
            raise MetricError(str(e)) from None
        if name == "digits-fd":
            from .digits import DigitsMetrics

            if scorer is None:
                with torch.random.fork_rng(devices=[]):
                    scorer = DigitsMetrics(log=log)
            self.scorer = scorer  # a DigitsMetrics, shared between evaluators
        else:
            from .inception import load_inception

            self.ref = load_ref(ref)
            self.extractor = load_inception(inception, self.device)

    @property
    def nfe(self) -> int:
        from .. import solvers

        return solvers.nfe(self.solver, self.steps, self.afs)

    @torch.no_grad()
    def samples(self, net) -> torch.Tensor:
        from .. import solvers
        from ..sampling import edm_sampler, seed_labels

        out = []
        label_dim = getattr(net, "label_dim", 0)
        for i in range(0, self.num, self.batch):
            seeds = list(range(i, min(i + self.batch, self.num)))
            labels = seed_labels(seeds, label_dim, self.device)
            if self.sampler not in ("heun", "euler") or self.schedule != "edm" or self.afs:
                x = solvers.sample(net, seeds, solver=self.solver, steps=self.steps, schedule=self.schedule,
                                   class_labels=labels, device=self.device, afs=self.afs)
            else:
                x = edm_sampler(net, seeds, num_steps=self.steps, class_labels=labels, device=self.device,
                                heun=self.sampler == "heun")
            out.append(x.float().cpu())
        return torch.cat(out)

    def __call__(self, net) -> dict:
        t0 = time.time()
        was_training = net.training
        net.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                images = self.samples(net)
                if self.name == "digits-fd":
                    values = self.scorer.evaluate(images)
                else:
                    from .inception import features

                    u8 = (images.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
                    feats = features(self.extractor, (u8[i:i + self.batch] for i in range(0, len(u8), self.batch)),
                                     self.device)
                    values = dict(fid=frechet_distance(*statistics(feats), *self.ref))
        finally:
            net.train(was_training)
        values = {k: float(v) for k, v in values.items()}
        return dict(values, nfe=self.nfe, num=self.num, sampler=self.sampler, schedule=self.schedule,
                    **({"afs": True} if self.afs else {}), seconds=time.time() - t0)
