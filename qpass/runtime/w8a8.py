"""W8A8 linear: int8 weights (symmetric, per output channel) x int8 activations (asymmetric, per tensor, static;
or symmetric per token, dynamic: :func:`w8a8_dynamic_linear` below).

The arithmetic of the MindIE format (``../shared/FORMATS.md`` section 1):

    xq = clamp(round(x / input_scale + input_offset), -128, 127)             int8 [..., k]
    y  = (xq @ Wq^T + quant_bias) * deq_scale                                  [..., n]
    deq_scale  = input_scale * weight_scale                                    float32 [n]
    quant_bias = round(bias / deq_scale - sum_k Wq[n, k] * input_offset)       int32 [n]

The int8 x int8 -> int32 product uses ``torch._int_mm`` (oneDNN, fast with AVX-512 and VNNI on x86
CPUs). On a CPU whose torch dispatch level is below AVX-512, ``_int_mm`` has no fast kernel (about 30x
slower than a float matmul of the same shape, ``docs/benchmarks.md``), so there the product is taken
as a float64 matmul of the int8 values: every product and partial sum is an integer below 2^53, so the
int32 result is exactly ``_int_mm``'s, about 10x sooner.
"""

from dataclasses import dataclass

import torch

from qpass.core.int8 import QMAX, QMIN, quantize_weight

FAST_INT8_CPU = ("AVX512",)  # torch CPU dispatch levels whose oneDNN int8 GEMM is fast


@dataclass(frozen=True)
class W8A8Weights:
    """The tensors of one quantized Linear, as the MindIE format stores them."""

    weight: torch.Tensor  # int8 [n, k]
    weight_scale: torch.Tensor  # float32 [n]
    input_scale: torch.Tensor  # float32 [1]
    input_offset: torch.Tensor  # float32 [1], an integer value
    deq_scale: torch.Tensor  # float32 [n]
    quant_bias: torch.Tensor  # int32 [n]


def w8a8_weights(
    weight: torch.Tensor, bias: torch.Tensor | None, input_scale: float, input_offset: float
) -> W8A8Weights:
    """Quantize a Linear's float ``weight [n, k]`` and ``bias [n]`` for activations with the given per-tensor
    qparams."""
    wq, w_scale = quantize_weight(weight)
    in_scale = torch.tensor([float(input_scale)], dtype=torch.float32)
    in_offset = torch.tensor([float(round(input_offset))], dtype=torch.float32)
    deq = (in_scale * w_scale).float()
    b = torch.zeros(wq.shape[0]) if bias is None else bias.detach().float()
    correction = wq.to(torch.int64).sum(dim=1).double() * in_offset.double()
    quant_bias = torch.round(b.double() / deq.double() - correction).clamp(-(2**31), 2**31 - 1).to(torch.int32)
    return W8A8Weights(wq, w_scale, in_scale, in_offset, deq, quant_bias)


def quantize_activation(x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
    """``clamp(round(x / input_scale + input_offset))`` as int8: the MindIE format's order, which rounds a tie
    (``x / scale`` at .5) differently from the Q/DQ ops' ``round(x / scale) + offset`` (:mod:`qpass.core.int8`),
    so it is kept apart from them."""
    return torch.round(x.float() / input_scale + input_offset).clamp_(QMIN, QMAX).to(torch.int8)


def int8_matmul(xq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``xq [m, k] @ weight [n, k]^T`` with int32 accumulation, exactly, by the faster path on this device."""
    if xq.device.type == "cpu" and torch.backends.cpu.get_cpu_capability() not in FAST_INT8_CPU:
        return (xq.double() @ weight.double().t()).to(torch.int32)
    return torch._int_mm(xq, weight.t())


@torch.library.custom_op("qpass::w8a8_linear", mutates_args=())
def w8a8_linear(
    x: torch.Tensor,
    input_scale: torch.Tensor,
    input_offset: torch.Tensor,
    weight: torch.Tensor,
    quant_bias: torch.Tensor,
    deq_scale: torch.Tensor,
) -> torch.Tensor:
    """``x [..., k]`` (float) through the int8 Linear ``weight [n, k]``; returns ``[..., n]`` in ``x.dtype``."""
    xq = quantize_activation(x, input_scale, input_offset).reshape(-1, x.shape[-1])
    acc = int8_matmul(xq, weight) + quant_bias  # int32 [m, n]
    return (acc.float() * deq_scale).to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


@w8a8_linear.register_fake
def _(x, input_scale, input_offset, weight, quant_bias, deq_scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def w8a8_linear_reference(x: torch.Tensor, w: W8A8Weights) -> torch.Tensor:
    """The same in plain float64 arithmetic: the ground truth for tests."""
    xq = quantize_activation(x, w.input_scale, w.input_offset).double()
    acc = xq @ w.weight.double().t() + w.quant_bias.double()
    return (acc * w.deq_scale.double()).to(x.dtype)


class W8A8Linear(torch.nn.Module):
    """A drop-in for ``nn.Linear`` that runs :func:`w8a8_linear`; its tensors are buffers."""

    def __init__(self, w: W8A8Weights):
        super().__init__()
        for name in ("weight", "weight_scale", "input_scale", "input_offset", "deq_scale", "quant_bias"):
            self.register_buffer(name, getattr(w, name))
        self.out_features, self.in_features = w.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_linear(x, self.input_scale, self.input_offset, self.weight, self.quant_bias, self.deq_scale)


# --- dynamic activations: each token quantized with its own symmetric scale at run time -------------------------
#
#     s_t = max_k |x[t, k]| / 127     (1 where the row is all zero)                    float32 [m, 1]
#     xq  = clamp(round(x / s_t), -127, 127)                                            int8 [m, k]
#     y   = (xq @ Wq^T) * s_t * weight_scale + bias                                     [m, n]
#
# msModelSlim's W8A8_DYNAMIC, vllm-ascend's ``w8a8_dynamic`` (``npu_dynamic_quant`` then ``npu_quant_matmul`` with
# ``pertoken_scale``) and compressed-tensors' ``dynamic: true, strategy: token, symmetric: true``.


@dataclass(frozen=True)
class W8A8DynamicWeights:
    """The tensors of one Linear with int8 weights and per-token dynamic int8 activations."""

    weight: torch.Tensor  # int8 [n, k]
    weight_scale: torch.Tensor  # float32 [n]
    bias: torch.Tensor  # float32 [n] (zeros when the Linear has none)


def w8a8_dynamic_weights(weight: torch.Tensor, bias: torch.Tensor | None) -> W8A8DynamicWeights:
    """Quantize a Linear's float ``weight [n, k]`` (symmetric, per output channel); ``bias [n]`` stays float."""
    wq, w_scale = quantize_weight(weight)
    b = torch.zeros(wq.shape[0]) if bias is None else bias.detach().float().clone()
    return W8A8DynamicWeights(wq, w_scale.float(), b)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [m, k]`` -> ``(xq int8 [m, k], scale float32 [m, 1])``, symmetric, one scale per row."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax)).clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale


@torch.library.custom_op("qpass::w8a8_dynamic_linear", mutates_args=())
def w8a8_dynamic_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``x [..., k]`` (float) through the int8 Linear ``weight [n, k]``, each token quantized with its own scale;
    int32 accumulation, exact. Returns ``[..., n]`` in ``x.dtype``."""
    xq, scale = quantize_per_token(x.reshape(-1, x.shape[-1]))
    acc = int8_matmul(xq, weight)  # int32 [m, n]
    y = acc.float() * scale * weight_scale + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


@w8a8_dynamic_linear.register_fake
def _(x, weight, weight_scale, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def w8a8_dynamic_linear_reference(x: torch.Tensor, w: W8A8DynamicWeights) -> torch.Tensor:
    """The same in plain float64 arithmetic (per-token quantization as :func:`quantize_per_token`): the ground
    truth for tests."""
    xq, scale = quantize_per_token(x.reshape(-1, x.shape[-1]))
    acc = xq.double() @ w.weight.double().t()
    y = acc * scale.double() * w.weight_scale.double() + w.bias.double()
    return y.to(x.dtype).reshape(*x.shape[:-1], w.weight.shape[0])


class W8A8DynamicLinear(torch.nn.Module):
    """A drop-in for ``nn.Linear`` that runs :func:`w8a8_dynamic_linear`; its tensors are buffers."""

    def __init__(self, w: W8A8DynamicWeights):
        super().__init__()
        for name in ("weight", "weight_scale", "bias"):
            self.register_buffer(name, getattr(w, name))
        self.out_features, self.in_features = w.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_dynamic_linear(x, self.weight, self.weight_scale, self.bias)
