"""What W8A8 calibration measures at a Linear's input, and the numbers made from it.

:class:`LinearObserver` watches one Linear input ``x [..., C]``: per-channel min / max / mean|x|, the
per-tensor moments (for ``max|x| / std``) and a strided sample of tokens ``[tokens, C]``. From it come
the per-tensor activation qparams of ``--act-method`` and, for smoothing, the quantized block error.
"""

import torch

from qpass.observers import affine_qparams, fake_quant
from qpass.runtime.w8a8 import quantize_weight

ACT_METHODS = {1: "min-max", 2: "histogram", 3: "auto"}
AUTO_RATIO = 50.0  # act-method 3: histogram when max(|min|, |max|) / std <= this, else min-max
# act-method 2 clip candidates, fractions of the observed range: per-tensor ranges of LLM activations can
# be 100x their bulk, so the grid reaches far lower than the per-channel observers' (qpass/observers.py)
CLIP_FRACTIONS = torch.logspace(0.0, -2.0, 81)
MAX_SEARCH_VALUES = 1 << 16


class LinearObserver(torch.nn.Module):
    """Statistics of a Linear's input ``x [..., C]``; keeps every ``stride``-th token, at most ``max_tokens``."""

    def __init__(self, stride: int = 1, max_tokens: int = 512):
        super().__init__()
        self.stride, self.max_tokens = stride, max_tokens
        self.min = self.max = self.abs_sum = None  # [C]
        self.count = 0
        self.total = self.total_sq = 0.0
        self.chunks: list[torch.Tensor] = []
        self.kept = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # [T, C]
        lo, hi, a = flat.amin(0), flat.amax(0), flat.abs().sum(0, dtype=torch.float64)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.abs_sum = a if self.abs_sum is None else self.abs_sum + a
        self.count += flat.shape[0]
        self.total += float(flat.sum(dtype=torch.float64))
        self.total_sq += float(flat.pow(2).sum(dtype=torch.float64))
        if self.kept < self.max_tokens:
            take = flat[:: self.stride][: self.max_tokens - self.kept].clone()
            self.chunks.append(take)
            self.kept += take.shape[0]
        return x

    def _check(self):
        if self.min is None:
            raise RuntimeError("linear observer saw no data: the calibration run never reached this Linear")

    @property
    def absmax(self) -> torch.Tensor:
        """``max |x|`` per channel, ``[C]``."""
        self._check()
        return torch.maximum(-self.min, self.max)

    @property
    def mean_abs(self) -> torch.Tensor:
        """``mean |x|`` per channel, ``[C]``."""
        self._check()
        return (self.abs_sum / self.count).float()

    def sample(self) -> torch.Tensor:
        """The kept tokens, ``[tokens, C]``."""
        self._check()
        return torch.cat(self.chunks)

    def range_ratio(self) -> float:
        """``max(|min|, |max|) / std`` over the whole tensor: how outlier-dominated the range is."""
        self._check()
        n = self.count * self.min.numel()
        mean = self.total / n
        std = max(self.total_sq / n - mean * mean, 0.0) ** 0.5
        return float(self.absmax.max()) / max(std, 1e-12)


def act_qparams(lo: float, hi: float, sample: torch.Tensor, ratio: float, act_method: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Per-tensor asymmetric ``(scale [1], offset [1], method used)`` for an activation with range ``[lo, hi]``.

    ``act_method``: 1 min-max; 2 histogram (the clip with the least L2 error on the sample,
    :func:`least_l2_clip`); 3 histogram when ``ratio = max(|lo|, |hi|) / std <= 50``, else min-max.
    """
    if act_method not in ACT_METHODS:
        raise ValueError(f"act_method={act_method} is not one of {sorted(ACT_METHODS)}")
    use_hist = act_method == 2 or (act_method == 3 and ratio <= AUTO_RATIO)
    lo_t, hi_t = torch.tensor([float(lo)]), torch.tensor([float(hi)])
    scale, offset = affine_qparams(lo_t, hi_t, symmetric=False)
    if use_hist:
        scale, offset = least_l2_clip(sample, lo_t, hi_t)
    return scale.float(), offset.float(), "histogram" if use_hist else "min-max"


def least_l2_clip(sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ``(scale [1], offset [1])`` of the clip ``[t lo, t hi]``, t on ``CLIP_FRACTIONS``, whose int8
    round trip has the least squared error on ``sample [tokens, C]`` (evenly strided whole tokens, at most
    ``MAX_SEARCH_VALUES`` values: striding the flattened values would see only the channels that are a
    multiple of the stride, and miss the outlier channels that decide the clip)."""
    rows = max(1, MAX_SEARCH_VALUES // sample.shape[-1])
    x = sample.reshape(-1, sample.shape[-1])
    x = x[:: -(-x.shape[0] // rows)].reshape(-1).float()
    best = (float("inf"), None)
    for t in CLIP_FRACTIONS:
        scale, offset = affine_qparams(lo * t, hi * t, symmetric=False)
        err = float((fake_quant(x, scale, offset) - x).pow(2).sum())
        if err < best[0]:
            best = (err, (scale, offset))
    return best[1]


def fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    """What the symmetric per-output-channel int8 weight gives back, ``[n, k]`` float."""
    wq, scale = quantize_weight(weight)
    return wq.float() * scale[:, None]


def quantized_output_error(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_method: int = 1,
                           reference: torch.Tensor | None = None, lo: torch.Tensor | None = None,
                           hi: torch.Tensor | None = None) -> float:
    """``sum_t ||fq(x_t / s) @ fq(W * s)^T - y_t||^2 / ||y_t||^2``, ``y = x @ W^T``: the output error of W8A8
    Linears after smoothing by ``s``, each token's error relative to its own output.

    Relative per token, because a few tokens (the first of a window, the attention sink) carry
    activations thousands of times the rest: in absolute terms their error alone would decide, and
    the search would trade every other token's precision for theirs.

    ``x [N, C]`` a sample of the shared input, ``weight [n, C]`` the consumers' weights stacked,
    ``scale [C]`` (ones: no smoothing). Activations are quantized per tensor as ``act_method`` says,
    over the range of the whole calibration run when given (``lo``, ``hi`` per channel ``[C]``: rare
    outlier tokens the sample missed still set the int8 step), else over the sample's range.
    """
    xs = x / scale
    lo = float(xs.min()) if lo is None else min(float((lo / scale).min()), float(xs.min()))
    hi = float(xs.max()) if hi is None else max(float((hi / scale).max()), float(xs.max()))
    ratio = max(-lo, hi) / max(float(xs.std()), 1e-12)
    s, o, _ = act_qparams(lo, hi, xs, ratio, act_method)
    ref = x @ weight.t() if reference is None else reference
    out = fake_quant(xs, s, o) @ fake_quant_weight(weight * scale).t()
    energy = ref.pow(2).sum(-1).clamp(min=torch.finfo(torch.float32).tiny)
    return float(((out - ref).pow(2).sum(-1) / energy).sum())


def output_sqnr_db(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> float:
    """SQNR (dB) of one W8A8 Linear's output on the sample ``x [N, k]`` with activation qparams ``(scale, offset)``."""
    ref = x @ weight.float().t()
    out = fake_quant(x, scale, offset) @ fake_quant_weight(weight).t()
    noise = float((out - ref).pow(2).sum())
    return float("inf") if noise == 0 else 10.0 * float(torch.log10(ref.pow(2).sum() / noise))


def minmax_input_qparams(model: torch.nn.Module, batches) -> dict[str, torch.Tensor]:
    """Per-tensor min-max input qparams of every decoder Linear (``model.layers.*``) of a Hugging Face
    ``model`` over ``batches`` of token ids, as the recipe's ``w8a8.<module>.input_scale`` / ``input_offset``
    tensors. No smoothing, no fallback: for round-trip tests and speed benchmarks, where the accuracy
    of the numbers does not matter. Each range includes 0."""
    ranges, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            def hook(_, inputs, __, name=name):
                lo, hi = ranges.get(name, (0.0, 0.0))
                ranges[name] = (min(lo, inputs[0].min().item()), max(hi, inputs[0].max().item()))
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for h in hooks:
            h.remove()
    tensors = {}
    for name, (lo, hi) in ranges.items():
        scale, offset = affine_qparams(torch.tensor([lo]), torch.tensor([hi]), symmetric=False)
        tensors[f"w8a8.{name}.input_scale"] = scale
        tensors[f"w8a8.{name}.input_offset"] = offset
    return tensors
