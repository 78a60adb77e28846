"""CLIP score through open_clip's real model and tokenizer code."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import MissingWeightsError, MmttsError
from ..core.registry import VERIFIERS
from ..core.verifier import Verifier

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@VERIFIERS.register("clip")
class CLIPScore(Verifier):
    """Score = 100 * cosine(image embedding, text embedding), the usual CLIP score.

    Images (B, C, H, W) in [0, 1] (or uint8 pixels, divided by 255) are resized
    to the model's input size and normalised with CLIP's statistics; images far
    outside [0, 1] are refused. Build with :meth:`from_pretrained` for a named
    open_clip architecture and a local weights file, or pass any open_clip model
    and tokenizer.

    Args:
        model: an open_clip model (``encode_image`` / ``encode_text``).
        tokenizer: its tokenizer.
        prompt: the text of every candidate; without it each candidate's prompt comes
            from the process context (``context["prompt"]``).
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        name: the verifier's name.
        nonfinite: what a NaN or infinite score does (``"last"`` ranks it last, ``"error"`` raises).
    """

    def __init__(self, model, tokenizer, prompt: str | None = None, mean=CLIP_MEAN, std=CLIP_STD,
                 name: str = "clip", nonfinite: str = "last"):
        super().__init__(nonfinite)
        if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
            kind = ("a transformers CLIPModel" if hasattr(model, "get_image_features")
                    else f"a {type(model).__name__}")
            raise MmttsError(f"CLIPScore needs an open_clip model (encode_image / encode_text); got {kind}. Load the "
                             "checkpoint with open_clip (CLIPScore.from_pretrained(arch, weights)), or wrap the model "
                             "in a Verifier of your own")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.mean = torch.tensor(mean).reshape(1, -1, 1, 1)
        self.std = torch.tensor(std).reshape(1, -1, 1, 1)
        size = getattr(getattr(model, "visual", None), "image_size", 224)
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.name = name
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, arch: str, weights: str, **kwargs) -> "CLIPScore":
        """open_clip's factory on a local checkpoint file; nothing is downloaded."""
        import os

        import open_clip
        if not os.path.exists(weights):
            raise MissingWeightsError(f"no CLIP weights at {weights!r}; pass the path of a local open_clip checkpoint")
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=weights)
        return cls(model, open_clip.get_tokenizer(arch), **kwargs)

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        if prompt not in self._text_cache:
            dev = next(self.model.parameters()).device
            ctx_len = getattr(self.model, "context_length", None)
            tokens = self.tokenizer([prompt])
            if ctx_len is not None and tokens.shape[1] > ctx_len:
                tokens = tokens[:, :ctx_len]
            self._text_cache[prompt] = F.normalize(self.model.encode_text(tokens.to(dev)).float(), dim=-1).cpu()
        return self._text_cache[prompt]

    @torch.no_grad()
    def score(self, outputs, context=None):
        if not isinstance(outputs, torch.Tensor) or outputs.ndim != 4 or outputs.shape[1] not in (1, 3):
            got = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise MmttsError(f"CLIP scores RGB or grey image batches (B, C, H, W) in [0, 1]; got {got}")
        if outputs.dtype == torch.uint8:  # 0-255 pixels: the conversion is unambiguous
            imgs = outputs.float() / 255.0
        elif outputs.is_floating_point():
            imgs = outputs.float()
            finite = imgs[torch.isfinite(imgs)]
            if finite.numel() and (float(finite.max()) > 1.5 or float(finite.min()) < -0.5):
                raise MmttsError(f"CLIP scores images in [0, 1]; these span [{float(finite.min()):.3g}, "
                                 f"{float(finite.max()):.3g}]: divide 0-255 pixels by 255, or map [-1, 1] images "
                                 "with (x + 1) / 2")
        else:
            raise MmttsError(f"CLIP scores float images in [0, 1] or uint8 pixels; got dtype {outputs.dtype}")
        if imgs.shape[1] == 1:
            imgs = imgs.expand(-1, 3, -1, -1)
        imgs = F.interpolate(imgs, size=self.size, mode="bicubic", align_corners=False).clamp(0, 1)
        imgs = (imgs - self.mean) / self.std
        dev = next(self.model.parameters()).device
        img = F.normalize(self.model.encode_image(imgs.to(dev)).float(), dim=-1).cpu()
        if self.prompt is not None:
            prompts = [self.prompt] * len(outputs)
        elif isinstance(context, dict) and "prompt" in context:
            prompts = list(context["prompt"])
        else:
            raise MmttsError("CLIP score needs a prompt: pass prompt= or use a process with a prompt")
        txt = torch.cat([self.text_embedding(p) for p in prompts])
        return 100.0 * (img * txt).sum(1)
