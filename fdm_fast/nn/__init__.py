"""Networks: EDM's SongUNet (DDPM++/NCSN++), ADM (DhariwalUNet) and the preconditioned denoiser."""

from .networks import (ARCHS, DhariwalUNet, SongUNet, adm_unet, count_parameters, network_settings,  # noqa: F401
                       song_unet)
from .precond import Denoiser, build_denoiser  # noqa: F401
