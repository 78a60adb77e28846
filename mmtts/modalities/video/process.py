"""VideoProcess: a whole clip denoised jointly, one stage per denoising step.

Every frame of a clip is one latent (B, C, T, H, W), so the image process's
machinery applies unchanged: the same :class:`Schedule`, the same
:func:`mmtts.kernels.denoise_step`, perturbation and re-noising, with the
noise of every candidate drawn from its own stream. What a video adds is
the decode: frames go through the VAE in chunks (:func:`decode_frames`), and
a diffusers text-to-video pipeline can be searched with its own components
(:meth:`VideoProcess.from_pipeline`). Best-of-N over this process is
"random linear search"; zero-order, paths, EvoSearch, beam and particle
filtering run on it as on images.
"""

from __future__ import annotations

import torch

from ...core.errors import MmttsError
from ...core.settings import whole
from ..image.process import ImageProcess
from ..image.schedulers import schedule_from_scheduler
from .decode import decode_frames


class VideoProcess(ImageProcess):
    """Search over the joint denoising trajectory of every frame of a clip.

    Outputs (finish and preview) are (B, C, T, H, W) frames in [0, 1] on the CPU.
    The preview is x0-hat of the whole clip, decoded.

    Args:
        model: the video denoiser: a diffusers ``UNet3DConditionModel`` or any ``fn(x, t, cond)`` over
            (B, C, T, H, W) latents.
        schedule: a :class:`~mmtts.modalities.image.Schedule` (see ``schedule_from_scheduler``).
        sample_shape: (C, T, H, W) of one clip's latent.
        decode_chunk: frames per VAE call when decoding (None: every frame at once); the result does not
            depend on it.
        **image_kwargs: the :class:`~mmtts.modalities.image.ImageProcess` keywords (``cond``, ``uncond``,
            ``guidance_scale``, ``vae``, ``vae_scale``, ``prompt``, ``device``, ``dtype``, ``output_range``).
    """

    sample_layout = ("channels", "frames", "height", "width")

    def __init__(self, model, schedule, sample_shape, *, decode_chunk: int | None = 8, **image_kwargs):
        frames = tuple(sample_shape)[1:2] if isinstance(sample_shape, (tuple, list, torch.Size)) else ()
        if frames and isinstance(frames[0], (int, float)) and frames[0] < 1:
            raise MmttsError(f"a clip needs at least one frame; sample_shape {tuple(sample_shape)} has {frames[0]}")
        super().__init__(model, schedule, sample_shape, **image_kwargs)
        self.decode_chunk = None if decode_chunk is None else whole("decode_chunk", decode_chunk, "VideoProcess")

    @property
    def frames(self) -> int:
        return self.sample_shape[1]

    @classmethod
    def from_pipeline(cls, pipe, *, num_frames: int = 16, num_inference_steps: int = 50, prompt: str | None = None,
                      prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None, guidance_scale: float = 1.0,
                      height: int | None = None, width: int | None = None, scheduler=None, update: str | None = None,
                      eta: float | None = None, decode_chunk: int | None = 8, device=None,
                      dtype=None) -> "VideoProcess":
        """Search with a diffusers text-to-video pipeline's components (``TextToVideoSDPipeline``: a
        ``UNet3DConditionModel``, a DDIM/DDPM scheduler, an image VAE, a CLIP text encoder).

        With the pipeline's deterministic scheduler (DDIM, eta 0) and the same
        initial noise, the finished clip is the pipeline's own output.
        ``scheduler`` replaces the pipeline's (multistep solvers such as
        DPMSolverMultistepScheduler are refused with that fix). Without a
        prompt the empty prompt conditions the model, as the pipeline does.
        """
        model = getattr(pipe, "unet", None)
        if model is None or type(model).__name__ != "UNet3DConditionModel":
            kind = type(model).__name__ if model is not None else "no unet"
            raise MmttsError(f"{type(pipe).__name__} has {kind}; from_pipeline reads pipelines with a "
                             "UNet3DConditionModel (TextToVideoSDPipeline). For another video model build "
                             "VideoProcess(fn, schedule, (C, T, H, W)) with fn(x, t, cond) calling it")
        if int(num_frames) < 1:
            raise MmttsError(f"num_frames={num_frames} must be at least 1")
        sched = scheduler or pipe.scheduler
        schedule = schedule_from_scheduler(sched, num_inference_steps, update=update, eta=eta)
        if float(getattr(sched, "init_noise_sigma", 1.0)) != 1.0:
            raise MmttsError(f"{type(sched).__name__} starts from noise of std {sched.init_noise_sigma}; use a "
                             "DDIM or DDPM scheduler (unit initial noise)")
        vae = getattr(pipe, "vae", None)
        cfg = model.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        ds = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        shape = (cfg.in_channels, int(num_frames), height // ds if height else size, width // ds if width else size)
        if prompt_embeds is not None:
            cond = prompt_embeds[0]
        else:
            cond = cls._encode(pipe, prompt or "")
        uncond = None
        if guidance_scale != 1.0:
            uncond = negative_prompt_embeds[0] if negative_prompt_embeds is not None else cls._encode(pipe, "")
        return cls(model, schedule, shape, cond=cond, uncond=uncond, guidance_scale=guidance_scale, vae=vae,
                   prompt=prompt, device=device or getattr(pipe, "device", "cpu"),
                   dtype=dtype or getattr(model, "dtype", torch.float32), decode_chunk=decode_chunk)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent clips to frames in [0, 1] (B, C, T, H, W), ``decode_chunk`` frames per VAE call."""
        return decode_frames(latents, self.vae, scale=self.vae_scale, chunk=self.decode_chunk,
                             output_range=self.output_range)

    def describe(self) -> dict:
        return {**super().describe(), "frames": self.frames, "decode_chunk": self.decode_chunk}
