"""Perplexity of any logits function over token windows ``[N, W]``, and the one batch loop everything uses."""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

Score = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``(logits [B, W, vocab], windows [B, W], the batch's index in its run) -> float64 [B]``, one figure per window: the
mean next-token NLL (:func:`batch_nll`) or a divergence from a reference run (:class:`Divergence`)."""


def batches(windows: torch.Tensor, batch_size: int, desc: str):
    """``windows [N, W]`` in batches of ``batch_size`` rows, with a progress bar on a terminal (quiet in CI)."""
    return tqdm(windows.split(batch_size), desc=desc, unit="batch", leave=False, disable=None)


def perplexity(logits_fn, windows: torch.Tensor, batch_size: int, desc: str = "eval") -> float:
    """``exp`` of the mean next-token NLL over ``windows [N, W]`` (each window predicts W - 1 tokens)."""
    return math.exp(float(window_nll(logits_fn, windows, batch_size, desc).mean()))


def window_nll(
    logits_fn, windows: torch.Tensor, batch_size: int, desc: str = "eval", score: Score | None = None
) -> torch.Tensor:
    """The mean next-token NLL of each of ``windows [N, W]``, float64 ``[N]`` (or what ``score`` gives per window)."""
    score = score or batch_nll
    with torch.no_grad():
        return torch.cat(
            [score(logits_fn(batch), batch, i) for i, batch in enumerate(batches(windows, batch_size, desc))]
        )


def batch_nll(logits: torch.Tensor, batch: torch.Tensor, index: int = 0) -> torch.Tensor:
    """The mean next-token NLL of each window of ``batch [B, W]`` from its ``logits [B, W, vocab]``, float64 ``[B]``
    (``index``, the batch's place in its run, is what a :data:`Score` is given; the NLL needs none)."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
    return nll.double().view(batch.shape[0], -1).mean(1)


class Divergence:
    """A :data:`Score`: the mean per-token KL divergence of each window's next-token distribution from a reference
    model's on the same windows, float64 ``[B]`` in nats, less noisy than an NLL difference (it weighs every
    outcome by the reference's probability instead of scoring the one token the text has).

    :meth:`record` is the score of the reference's run (it keeps, per batch, the reference's ``TOP`` most likely
    tokens and their log-probabilities, and gives the NLL); calls of the object itself, over the same windows in the
    same batches, compare another run with it. The divergence is that of the ``TOP`` tokens and the rest pooled as one
    outcome: a lower bound of the full one, within a small fraction of it when the reference's top tokens hold most of
    its probability, and it keeps ``TOP`` values per token, not the vocabulary."""

    TOP = 64

    def __init__(self):
        self.reference: dict[int, tuple] = {}  # batch index -> its top log-probs, their token ids, the rest's

    def record(self, logits: torch.Tensor, batch: torch.Tensor, index: int) -> torch.Tensor:
        top, ids, rest = _split(logits, top=self.TOP)
        self.reference[index] = (top, ids, rest)
        return batch_nll(logits, batch)

    def __call__(self, logits: torch.Tensor, batch: torch.Tensor, index: int) -> torch.Tensor:
        if index not in self.reference:
            raise ValueError(f"Divergence: batch {index} has no reference run; record the reference's run first")
        top_p, ids, rest_p = self.reference[index]
        top_q, _, rest_q = _split(logits, ids)
        pooled = torch.where(rest_p.isfinite(), rest_p.exp() * (rest_p - rest_q.clamp(min=LOG_TINY)), 0.0)
        kl = (top_p.exp() * (top_p - top_q)).sum(-1) + pooled
        return kl.clamp(min=0.0).double().mean(1)


LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


def _split(logits: torch.Tensor, ids: torch.Tensor | None = None, top: int = 0):
    """``(log-probabilities of the tokens ids [B, W - 1, k], ids, log-probability of all others pooled [B, W - 1])``
    of next-token ``logits [B, W, vocab]``; ``ids`` None: the ``top`` most likely. The pool is summed
    over its own tokens (not ``1 -`` the top's mass, which float32 rounds to 0 when the top holds nearly all)."""
    log_p = logits[:, :-1].float().log_softmax(-1)
    if ids is None:
        values, ids = log_p.topk(min(top, log_p.shape[-1]), dim=-1)
    else:
        values = log_p.gather(-1, ids)
    return values, ids, log_p.scatter_(-1, ids, float("-inf")).logsumexp(-1)  # in place: no second vocab-wide copy
