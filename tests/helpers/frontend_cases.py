"""Tiny models behind the torch.export frontend, for tests that calibrate and rewrite them."""

import torch

from qpass.core.calibrate import calibrate
from qpass.core.config import QuantConfig
from qpass.frontends.torch_export.frontend import TorchExportFrontend
from qpass.models.loaders import LoadedModel


def frontend(model: torch.nn.Module, window: int, tokenizer=None) -> TorchExportFrontend:
    """``model`` captured over ``[batch, window]`` token ids."""
    return TorchExportFrontend(LoadedModel(model, tokenizer, "test", type(model).__name__), window)


def calibrated(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4, **config):
    """``(frontend, recipe)`` of ``model`` calibrated on ``ids [N, W]`` with ``QuantConfig(**config)``."""
    fe = frontend(model, ids.shape[1])
    return fe, calibrate(fe, ids, QuantConfig(**config), batch_size)


def minmax_input_qparams(model: torch.nn.Module, batches) -> dict[str, torch.Tensor]:
    """Per-tensor min-max W8A8 input qparams of every decoder Linear (``model.layers.*``) of a Hugging Face
    ``model`` over ``batches`` of token ids, as recipe tensors. No smoothing, no fallback: for round trips,
    where the accuracy of the numbers does not matter. Each range includes 0."""
    from qpass.core.int8 import affine_qparams
    from qpass.core.recipe import linear_key

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
        tensors[linear_key(name, "scale")], tensors[linear_key(name, "offset")] = scale, offset
    return tensors
