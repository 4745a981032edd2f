"""Perplexity over token windows: of a program we built, and of the model through its own framework."""

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def perplexity(logits_fn, windows: torch.Tensor, batch_size: int, desc: str = "eval") -> float:
    """``exp`` of the mean next-token NLL over ``windows [N, W]`` (each window predicts W - 1 tokens)."""
    return math.exp(float(window_nll(logits_fn, windows, batch_size, desc).mean()))


def window_nll(logits_fn, windows: torch.Tensor, batch_size: int, desc: str = "eval") -> torch.Tensor:
    """The mean next-token NLL of each of ``windows [N, W]``, float64 ``[N]``."""
    out = []
    with torch.no_grad():
        for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", leave=False, disable=None):
            logits = logits_fn(batch)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
            out.append(nll.double().view(batch.shape[0], -1).mean(1))
    return torch.cat(out)


def reference_perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """The same perplexity as the model's framework computes it: Hugging Face's ``labels=`` loss."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(windows.split(batch_size), desc="eval reference", unit="batch", leave=False, disable=None):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            n = batch[:, 1:].numel()
            nll += loss.item() * n
            count += n
    return math.exp(nll / count)
