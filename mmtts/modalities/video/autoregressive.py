"""FrameARProcess: a clip generated unit by unit, each unit a diffusion conditioned on the frames before it.

This is the shape of frame-autoregressive video models (Pyramid-Flow,
NOVA): a unit of one or more frames is denoised to the end before the next
one starts, and the model sees the last ``context_frames`` frames made so
far. A stage is one denoising step of one unit, so stage s is step
``s % stages_per_unit`` of unit ``s // stages_per_unit``.

The unit's diffusion is an image diffusion over the unit's latent (frames
stacked as channels), and the process delegates to
:class:`~mmtts.modalities.image.ImageProcess` for what that shares with
images: the update (:func:`mmtts.kernels.denoise_step` on the schedule's
coefficients), the mutation of :meth:`perturb` and the forward re-noising.
When a unit's last step is taken its frames join the clip and the next
unit's initial noise is drawn from the candidate's stream, so a candidate
copied at a unit boundary carries the noise its next unit starts from
(:meth:`perturb` at that boundary with scale 1 replaces it with fresh noise).

The preview is the partial video: the finished units plus the current
unit's x0-hat, decoded; it has ``frames_through(stage)`` frames.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...core.errors import MmttsError
from ...core.process import Process
from ...core.rng import Streams
from ...core.state import State
from ...kernels import denoise_step
from ..image.process import ImageProcess
from ..image.schedulers import Schedule
from .decode import decode_frames


def frame_denoiser(model) -> Callable:
    """A uniform ``fn(x, t, context) -> prediction`` over a unit's latent (B, u*C, H, W) and its context frames
    (B, k*C, H, W): a diffusers ``UNet2DModel`` gets them stacked as channels; a function is called as is."""
    if type(model).__name__ == "UNet2DModel":
        return lambda x, t, ctx: model(torch.cat([x, ctx], 1), t).sample
    if callable(model):
        return lambda x, t, ctx: (lambda out: out.sample if hasattr(out, "sample") else out)(model(x, t, ctx))
    raise MmttsError(f"cannot call a {type(model).__name__} as a frame denoiser; pass a UNet2DModel taking the "
                     "unit and its context frames as channels, or a function fn(x, t, context)")


class FrameARProcess(Process):
    """Search over a frame-autoregressive video model, one denoising step of one unit per stage.

    Outputs are (B, C, T, H, W) frames in [0, 1] on the CPU; a preview has the
    frames made so far (the current unit as its x0-hat) and needs every
    candidate of the batch to be in the same unit.

    Args:
        model: a ``UNet2DModel`` with (u + k) * C input and u * C output channels, or ``fn(x, t, context)``.
        schedule: a :class:`~mmtts.modalities.image.Schedule` of one unit's denoising; its steps are the
            unit's stages.
        frame_shape: (C, H, W) of one frame's latent.
        frames: frames per clip (a multiple of ``unit_frames``).
        unit_frames: frames generated together, u.
        context_frames: previous frames the model sees, k, most recent first (zeros before the clip starts).
        vae: decodes latent frames (without it the latents are the pixels).
        vae_scale: the latents' scaling factor (default: the VAE's ``config.scaling_factor``, else 1).
        decode_chunk: frames per VAE call (None: all at once); the result does not depend on it.
        device: where latents are drawn and the model runs.
        dtype: dtype of the latents.
        output_range: (low, high) of the decoded frames, mapped to [0, 1].
    """

    latent_key = "x"

    def __init__(self, model, schedule: Schedule, frame_shape, frames: int, *, unit_frames: int = 1,
                 context_frames: int = 1, vae=None, vae_scale: float | None = None, decode_chunk: int | None = 8,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, output_range=(-1.0, 1.0)):
        shape = tuple(int(s) for s in frame_shape)
        if len(shape) != 3:
            raise MmttsError(f"frame_shape {tuple(frame_shape)} must be (channels, height, width) of one frame")
        frames, unit_frames, context_frames = int(frames), int(unit_frames), int(context_frames)
        if frames < 1:
            raise MmttsError(f"a clip needs at least one frame, got frames={frames}")
        if unit_frames < 1 or frames % unit_frames:
            raise MmttsError(f"unit_frames={unit_frames} must be a positive divisor of frames={frames}")
        if context_frames < 0:
            raise MmttsError(f"context_frames={context_frames} must be >= 0")
        if decode_chunk is not None and int(decode_chunk) < 1:
            raise MmttsError(f"decode_chunk={decode_chunk} must be a positive number of frames, or None")
        self.model = model
        self.call = frame_denoiser(model)
        self.schedule = schedule
        self.frame_shape, self.frames = shape, frames
        self.unit_frames, self.context_frames = unit_frames, context_frames
        self.num_units = frames // unit_frames
        self.stages_per_unit = schedule.num_stages
        self.num_stages = self.num_units * self.stages_per_unit
        self.nfe_per_stage = 1
        self.device, self.dtype = torch.device(device), dtype
        c, h, w = shape
        self.unit_shape = (unit_frames * c, h, w)
        # the unit's diffusion as an image process: its perturbation, stochasticity and re-noising are the image's
        self.unit = ImageProcess(self.call, schedule, self.unit_shape, device=device, dtype=dtype)
        self.vae = vae
        self.vae_scale = vae_scale if vae_scale is not None else (
            getattr(getattr(vae, "config", None), "scaling_factor", 1.0) if vae is not None else 1.0)
        self.decode_chunk = decode_chunk
        self.decodes_on_preview = self.decodes_on_finish = vae is not None
        self.output_range = output_range

    # -- stages -----------------------------------------------------------------------
    def unit_of(self, stage: torch.Tensor) -> torch.Tensor:
        """The unit a candidate at ``stage`` is working on (``num_units`` once done)."""
        return torch.as_tensor(stage) // self.stages_per_unit

    def frames_through(self, stage: int) -> int:
        """Frames in the preview of a candidate at ``stage`` (>= 1): the finished units and the one in progress."""
        stage = int(stage)
        if stage < 1:
            raise MmttsError("no preview before a candidate's first denoising step")
        return min((stage - 1) // self.stages_per_unit + 1, self.num_units) * self.unit_frames

    # -- Process --------------------------------------------------------------------------
    def init(self, streams: Streams, first_index: int = 0) -> State:
        x = streams.randn(self.unit_shape, device=self.device, dtype=self.dtype)
        c, h, w = self.frame_shape
        video = torch.zeros(len(streams), c, self.frames, h, w, device=self.device, dtype=self.dtype)
        return State.fresh({"x": x, "x0": torch.zeros_like(x), "video": video}, streams, first_index)

    def context(self, state: State):
        return None

    def _context_frames(self, video: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """The k frames before each candidate's unit, most recent first, as (B, k*C, H, W) (zeros before frame 0)."""
        b, c, _, h, w = video.shape
        first = (unit * self.unit_frames).to(video.device)
        out = video.new_zeros(b, self.context_frames, c, h, w)
        rows = torch.arange(b, device=video.device)
        for j in range(self.context_frames):
            src = first - 1 - j
            ok = src >= 0
            if bool(ok.any()):
                out[rows[ok], j] = video[rows[ok], :, src[ok]]
        return out.reshape(b, self.context_frames * c, h, w)

    def to_frames(self, x: torch.Tensor) -> torch.Tensor:
        """A unit's latent (B, u*C, H, W) as frames (B, C, u, H, W)."""
        b = x.shape[0]
        c, h, w = self.frame_shape
        return x.reshape(b, self.unit_frames, c, h, w).transpose(1, 2)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, stage: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """The model output for unit latents at per-candidate stages, given the clips made so far."""
        local = stage % self.stages_per_unit
        t = self.schedule.timesteps[local].to(self.device)
        out = self.call(x, t, self._context_frames(video, self.unit_of(stage)))
        bad = ~torch.isfinite(out.reshape(len(x), -1)).all(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise MmttsError(f"the model returned NaN/inf for {int(bad.sum())} candidate(s) (first: candidate {i} "
                             f"at unit {int(self.unit_of(stage[i]))}, step {int(local[i])}); check the model's "
                             "dtype (fp16 overflow) and inputs")
        return out

    def step(self, state: State) -> State:
        """One denoising step of each candidate's current unit; a finished unit joins the clip and the next
        unit's initial noise is drawn from the candidate's stream."""
        x, stage, video = state.data["x"], state.stage, state.data["video"]
        out = self.predict(x, stage, video)
        local = stage % self.stages_per_unit
        noise = state.streams.randn(self.unit_shape, device=x.device) if self.schedule.stochastic else None
        nxt, x0 = denoise_step(x, out, self.schedule.step_coefficients(local), z=noise)
        done = (local + 1 == self.stages_per_unit).nonzero()[:, 0]
        if len(done):
            video = video.clone()
            u = self.unit_frames
            frames = self.to_frames(nxt.index_select(0, done.to(nxt.device)))
            for j, i in enumerate(done.tolist()):
                first = int(self.unit_of(stage[i])) * u
                video[i, :, first:first + u] = frames[j]
            more = done[self.unit_of(stage[done]) + 1 < self.num_units]
            if len(more):
                sub = state.streams.take(more)
                fresh = sub.randn(self.unit_shape, device=x.device, dtype=x.dtype)
                state.streams.counters[more] = sub.counters
                nxt = nxt.clone()
                nxt[more.to(nxt.device)] = fresh
        new = state.replace(x=nxt, x0=x0, video=video)
        new.stage = stage + 1
        return new

    def _latents_through(self, state: State) -> torch.Tensor:
        stages = state.stage.tolist()
        counts = {self.frames_through(s) for s in stages}
        if len(counts) > 1:
            raise MmttsError(f"a preview needs every candidate in the same unit; the batch is at stages "
                             f"{sorted(set(stages))}: preview them separately (State.select)")
        n = counts.pop()
        video = state.data["video"][:, :, :n]
        open_ = [i for i, s in enumerate(stages) if s % self.stages_per_unit and s < self.num_stages]
        if open_:  # units still in progress: their frames are the x0-hat of the last step
            video = video.clone()
            idx = torch.tensor(open_)
            video[idx, :, n - self.unit_frames:n] = self.to_frames(state.data["x0"][idx.to(video.device)])
        return video

    def preview(self, state: State) -> torch.Tensor:
        """The partial videos (B, C, F, H, W): finished units and the current unit's x0-hat, decoded."""
        return self.decode(self._latents_through(state))

    def finish(self, state: State) -> torch.Tensor:
        return self.decode(state.data["video"])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent frames to frames in [0, 1], ``decode_chunk`` frames per VAE call."""
        return decode_frames(latents, self.vae, scale=self.vae_scale, chunk=self.decode_chunk,
                             output_range=self.output_range)

    # -- optional capabilities -----------------------------------------------------------
    def _in_unit(self, state: State, stage: torch.Tensor) -> State:
        return State.unchecked(state.data, stage, state.streams, state.ids, state.parents, state.origin, state.meta)

    def is_stochastic(self, stage: int) -> bool:
        """Whether the step from ``stage`` draws fresh noise (the unit's schedule decides)."""
        return self.unit.is_stochastic(int(stage) % self.stages_per_unit)

    def perturb(self, state: State, scale: float | torch.Tensor) -> State:
        """The image mutation of the current unit's latent at its step: at a unit's start the initial noise is
        mixed, sqrt(1 - b^2) x + b eps (b = 1: fresh noise), later x + b sigma_t eps."""
        out = self.unit.perturb(self._in_unit(state, state.stage % self.stages_per_unit), scale)
        return self._in_unit(out, state.stage)

    def renoise(self, state: State, stages: int) -> State:
        """Re-noise the current unit forward by up to ``stages`` steps (never past the unit's start)."""
        local = state.stage % self.stages_per_unit
        out = self.unit.renoise(self._in_unit(state, local), stages)
        return self._in_unit(out, state.stage - (local - out.stage))

    def describe(self) -> dict:
        return {**super().describe(), "frames": self.frames, "unit_frames": self.unit_frames,
                "context_frames": self.context_frames, "stages_per_unit": self.stages_per_unit,
                "decode_chunk": self.decode_chunk}
