"""The long-context check's runs on ONNX (:mod:`qpass.core.longcontext` judges them): the quantized model and the
float one in ONNX Runtime, each on its own cache (the quantized model's int8 ``present.*`` where it writes one), fed
back as ``past_key_values.*``: prefill in chunks, then token by token.

A scorer maps token ids ``[T]`` to ``(nll float64 [T - 1], hit bool [T - 1])``, as the torch.export one does.
"""

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qpass.frontends.onnx.session import Runner

PREFILL_CHUNK = 1024  # tokens per prefill run


def scores(runner: Runner, ids: list[int], prefill: int, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Score ``ids``: tokens ``0 .. prefill - 1`` in runs of at most :data:`PREFILL_CHUNK` tokens, each on the cache
    the previous runs returned, then tokens ``prefill .. T - 2`` one run each."""
    total = len(ids)
    steps = [(a, min(a + PREFILL_CHUNK, prefill)) for a in range(0, prefill, PREFILL_CHUNK)]
    steps += [(t, t + 1) for t in range(prefill, total - 1)]
    targets = torch.tensor(ids[1:])
    nll, hit = torch.empty(total - 1, dtype=torch.float64), torch.empty(total - 1, dtype=torch.bool)
    past = None
    for a, b in tqdm(steps, desc=desc, unit="run", leave=False, disable=None):
        logits, past = runner.step(np.array([ids[a:b]], dtype=np.int64), past, a)
        logits = torch.from_numpy(np.asarray(logits[0], dtype=np.float32))
        nll[a:b] = F.cross_entropy(logits, targets[a:b], reduction="none").double()
        hit[a:b] = logits.argmax(-1) == targets[a:b]
    return nll, hit
