"""The offline model cache: reference models trained on first use, saved with safetensors.

An entry lives in ``$MMTTS_CACHE/<name>-<hash>/`` (default: the user's cache
directory, ``~/.cache/mmtts``), where the hash is of the JSON config that
defines the model and its training, so a change of config trains a new entry
instead of silently reusing a stale one. Nothing is downloaded, ever.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..core.errors import MissingWeightsError


def default_cache_dir() -> Path:
    env = os.environ.get("MMTTS_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmtts"


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ModelCache:
    """A directory of trained weights, one entry per model name and config hash.

    Args:
        root: the cache directory; defaults to ``default_cache_dir()``.
    """

    WEIGHTS = "model.safetensors"
    CONFIG = "config.json"

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def entry(self, name: str, config: dict) -> Path:
        return self.root / f"{name}-{config_hash(config)}"

    def has(self, name: str, config: dict) -> bool:
        return (self.entry(name, config) / self.WEIGHTS).exists()

    def load(self, name: str, config: dict) -> dict[str, torch.Tensor]:
        path = self.entry(name, config) / self.WEIGHTS
        if not path.exists():
            raise MissingWeightsError(
                f"no cached weights for {name!r} at {path}; run `mmtts tasks prepare` for its task "
                "(or call load_or_train) to train them locally"
            )
        return load_file(str(path))

    def load_or_train(self, name: str, config: dict,
                      train: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Return cached tensors, training and saving them first if the entry is missing."""
        if self.has(name, config):
            return self.load(name, config)
        t0 = time.perf_counter()
        tensors = {k: v.detach().cpu().contiguous() for k, v in train().items()}
        seconds = time.perf_counter() - t0
        final = self.entry(name, config)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))
        try:
            save_file(tensors, str(tmp / self.WEIGHTS))
            (tmp / self.CONFIG).write_text(json.dumps(
                {"name": name, "config": config, "train_seconds": round(seconds, 3)}, indent=2, sort_keys=True))
            if final.exists():  # another process finished first; keep its copy
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.load(name, config)
