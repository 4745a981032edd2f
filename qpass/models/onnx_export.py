"""Export a Hugging Face causal LM to ONNX as a decoder with KV-cache I/O, the way deployment pipelines do.

``torch.onnx.export(dynamo=True)`` of a wrapper whose inputs are ``input_ids [B, S]``, ``attention_mask
[B, past + S]``, ``position_ids [B, S]`` and ``past_key_values.<i>.key/value [B, kv_heads, past, head_dim]``,
and whose outputs are ``logits [B, S, vocab]`` and ``present.<i>.key/value [B, kv_heads, past + S, head_dim]``.
At opsets 18-20 attention is exported as MatMul -> Add(mask) -> Softmax -> Where(IsNaN) -> MatMul; at 23 as
the ONNX ``Attention`` op. For tests (tiny models) and benchmarks (SmolLM2); qpass itself reads ONNX files.
"""

from pathlib import Path

import torch


class _KVDecoder(torch.nn.Module):
    """The model with its cache as flat tensors: ``(logits, present_0_key, present_0_value, ...)``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.layers = model, model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def export_decoder(model: torch.nn.Module, path: str | Path, opset: int = 20, external_data: bool = False) -> Path:
    """Write ``model`` (eval mode, float32) to ``path`` as an ONNX decoder with KV-cache I/O; returns ``path``."""
    config = model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    batch, seq, past_len = 2, 3, 2  # example sizes; every one is dynamic in the graph
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = tuple(torch.zeros(batch, kv_heads, past_len, head_dim) for _ in range(2 * layers))
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    dynamic = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past))
    cache_names = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    path = Path(path)
    with torch.no_grad():
        program = torch.onnx.export(
            _KVDecoder(model),
            (ids, mask, positions, past),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic,
            input_names=["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in cache_names)],
            output_names=["logits", *(f"present.{n}" for n in cache_names)],
            verbose=False,
        )
    program.save(str(path), external_data=external_data)
    return path
