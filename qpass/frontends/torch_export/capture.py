"""Capture a causal LM's forward over token ids as an ``ExportedProgram`` with ``torch.export``."""

import torch
from torch.export import Dim

from qpass.core.errors import QpassError

WRAPPER_PREFIX = "model."  # the capture wrappers hold the HF model as `.model` (here and in qpass/generate.py)


def param_names(program: torch.export.ExportedProgram) -> dict[str, str]:
    """Placeholder name -> the model's own parameter or buffer name (without the capture wrapper's prefix).

    Buffers count: a model read from a weight directory holds its int8 Linear weights as buffers."""
    signature = program.graph_signature
    names = {**signature.inputs_to_buffers, **signature.inputs_to_parameters}
    return {k: v.removeprefix(WRAPPER_PREFIX) for k, v in names.items()}


class LogitsOnly(torch.nn.Module):
    """``input_ids [B, S] -> logits [B, S, vocab]``, no KV cache: the float function that qpass captures."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def capture(model: torch.nn.Module, window: int) -> torch.export.ExportedProgram:
    """Export ``model`` over token ids ``[batch, window]``; the batch size is dynamic."""
    example = torch.zeros((2, window), dtype=torch.long)
    try:
        with torch.no_grad():
            return torch.export.export(
                LogitsOnly(model), (example,), dynamic_shapes=({0: Dim("batch", min=1, max=1024)},), strict=False
            )
    except Exception as err:  # torch.export raises many types; the user needs to know capture failed
        raise QpassError(
            f"capture: torch.export could not trace {type(model).__name__} "
            f"({type(err).__name__}: {str(err).splitlines()[0]}); "
            "qpass supports decoder-only Hugging Face causal LMs"
        ) from err
