"""Video diffusion: a whole-clip process, a frame-autoregressive process, chunked decoding, moving-digit data."""

from .autoregressive import FrameARProcess, frame_denoiser
from .decode import decode_frames
from .process import VideoProcess

__all__ = ["FrameARProcess", "VideoProcess", "decode_frames", "frame_denoiser"]
