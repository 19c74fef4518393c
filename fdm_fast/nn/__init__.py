"""Networks: EDM's SongUNet (DDPM++/NCSN++) and the preconditioned denoiser."""

from .networks import ARCHS, SongUNet, count_parameters, song_unet  # noqa: F401
from .precond import Denoiser, build_denoiser  # noqa: F401
