"""Perplexity of any logits function over token windows ``[N, W]``, and the one batch loop everything uses."""

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def batches(windows: torch.Tensor, batch_size: int, desc: str):
    """``windows [N, W]`` in batches of ``batch_size`` rows, with a progress bar on a terminal (quiet in CI)."""
    return tqdm(windows.split(batch_size), desc=desc, unit="batch", leave=False, disable=None)


def perplexity(logits_fn, windows: torch.Tensor, batch_size: int, desc: str = "eval") -> float:
    """``exp`` of the mean next-token NLL over ``windows [N, W]`` (each window predicts W - 1 tokens)."""
    return math.exp(float(window_nll(logits_fn, windows, batch_size, desc).mean()))


def window_nll(logits_fn, windows: torch.Tensor, batch_size: int, desc: str = "eval") -> torch.Tensor:
    """The mean next-token NLL of each of ``windows [N, W]``, float64 ``[N]``."""
    with torch.no_grad():
        return torch.cat([batch_nll(logits_fn(batch), batch) for batch in batches(windows, batch_size, desc)])


def batch_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """The mean next-token NLL of each window of ``batch [B, W]`` from its ``logits [B, W, vocab]``, float64 ``[B]``."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
    return nll.double().view(batch.shape[0], -1).mean(1)
