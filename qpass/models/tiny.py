"""Tiny random-weight models built from transformers' config classes, for structural tests and benchmarks."""

import torch

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3", "gpt2")


def tiny_config(arch: str, num_layers: int = 2, vocab_size: int = 256, hidden_size: int = 64):
    """A small config of ``arch`` with GQA where the architecture has it (4 heads, 2 KV heads, head_dim 16)."""
    import transformers as tf

    heads = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
    )
    if arch == "llama":
        return tf.LlamaConfig(**heads)
    if arch == "qwen2":
        return tf.Qwen2Config(**heads)
    if arch == "mistral":
        return tf.MistralConfig(**heads, sliding_window=8)
    if arch == "gemma3":
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        return tf.Gemma3TextConfig(**heads, head_dim=hidden_size // 4, sliding_window=8, layer_types=layer_types)
    if arch == "gpt2":
        return tf.GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            vocab_size=vocab_size,
            n_positions=512,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def tiny_model(arch: str, seed: int = 0, attn_implementation: str = "sdpa", **config_kwargs) -> torch.nn.Module:
    """A random-weight causal LM of ``arch`` in eval mode, the same for the same ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, **config_kwargs), attn_implementation=attn_implementation
    )
    return model.eval()


class NoAttention(torch.nn.Module):
    """An embedding and an MLP: a language-model-shaped graph with no attention (for negative tests)."""

    def __init__(self, vocab_size: int = 256, hidden: int = 32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, hidden)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, vocab_size)
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(input_ids))


def byte_tokenizer():
    """A byte-level tokenizer of 256 ids (no merges; id 0 is its EOS), to save beside a tiny model of vocabulary 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=alphabet[0])
