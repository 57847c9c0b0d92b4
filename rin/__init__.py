"""RIN diffusion model built on the fused kernels in `kernels`."""
from rin.model import RIN, VideoRIN

__all__ = ["RIN", "VideoRIN"]
