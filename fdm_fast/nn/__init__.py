"""Networks: EDM's SongUNet (DDPM++/NCSN++), ADM (DhariwalUNet) and the preconditioned denoiser."""

from .networks import ARCHS, DhariwalUNet, SongUNet, adm_unet, count_parameters, song_unet  # noqa: F401
from .precond import Denoiser, build_denoiser  # noqa: F401
