"""fdm_fast: a high-performance engine for the Fast Diffusion Model (FDM, arXiv 2306.06991).

Layers (docs/design.md section 2), data flowing one way:
``schedules`` (the math) -> ``ops`` (fused kernels) -> nn / sampling / loss -> train / generate.
"""

__version__ = "0.1.0"

from . import schedules  # noqa: E402,F401
