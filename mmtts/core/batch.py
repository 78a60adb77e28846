"""Operations on a batch of outputs of any of the shapes processes return.

An output batch is a tensor with the batch on dimension 0, a list (one item
per candidate, e.g. PIL images or action dicts), or a dict of such batches.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            raise ValueError("a 0-d tensor is not a batch: put the batch on dimension 0")
        return int(batch.shape[0])
    if isinstance(batch, dict):
        sizes = {k: batch_size(v) for k, v in batch.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"dict batch with inconsistent sizes: {sizes}")
        return next(iter(sizes.values()))
    if isinstance(batch, (list, tuple)):
        return len(batch)
    raise TypeError(f"cannot take the batch size of {type(batch).__name__}; use a tensor, list or dict")


def take(batch: Any, index: Sequence[int] | torch.Tensor) -> Any:
    """The items at ``index`` (duplicates allowed), in that order."""
    idx = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
    if isinstance(batch, torch.Tensor):
        return batch[idx.to(batch.device)]
    if isinstance(batch, dict):
        return {k: take(v, idx) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [batch[i] for i in idx.tolist()]
    raise TypeError(f"cannot index a batch of type {type(batch).__name__}")


def concat(batches: Sequence[Any]) -> Any:
    if not batches:
        raise ValueError("nothing to concatenate")
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches))
    if isinstance(first, dict):
        return {k: concat([b[k] for b in batches]) for k in first}
    if isinstance(first, (list, tuple)):
        return [x for b in batches for x in b]
    raise TypeError(f"cannot concatenate batches of type {type(first).__name__}")


def to_cpu(batch: Any) -> Any:
    """A detached CPU copy, suitable for checkpoints."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().cpu()
    if isinstance(batch, dict):
        return {k: to_cpu(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [to_cpu(v) for v in batch]
    return batch
