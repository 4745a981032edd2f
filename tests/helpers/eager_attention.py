"""The eager Hugging Face model with a formula applied where the attention sites are: what a pass's rewritten
program must compute (the passes' numbers tests)."""

import torch


def with_attention_inputs(model: torch.nn.Module, change) -> torch.nn.Module:
    """``model`` (Hugging Face, eager) with every attention's query, key and value replaced by
    ``change(layer, query, key, value)`` before Hugging Face's SDPA attention runs: query ``[B, H, S, D]`` after
    RoPE, key and value ``[B, H_kv, S, D]`` after RoPE and before GQA's repeat, where the attention sites are. A
    pass's formula applied there is what the rewritten program must compute (the numbers tests)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, *args, **kwargs):
        return sdpa_attention_forward(module, *change(module.layer_idx, query, key, value), *args, **kwargs)

    name = f"qpass_test_{id(change)}"
    AttentionInterface.register(name, attention)
    model.set_attn_implementation(name)
    return model
