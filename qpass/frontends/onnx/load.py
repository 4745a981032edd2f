"""Reading an ONNX decoder and what sits next to it (tokenizer files, ``genai_config.json``), refusing bad input
in one line: a missing, truncated or corrupt file, external data missing or outside the model's directory, an opset
below 17, no token-id input, no attention, logits that are not one output, a tokenizer that does not fit the
vocabulary."""

import json
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import CheckerPass, ShapeInferencePass

from qpass.core.errors import QpassError
from qpass.core.sites import AttentionSite
from qpass.frontends.onnx.session import described, logits_output
from qpass.models import loaders
from qpass.passes.onnx.external_data import check_external_data
from qpass.passes.onnx.find_attention_sites import ATTENTION_PATTERNS, CacheIO, find_attention_sites
from qpass.passes.onnx.find_gqa_sites import GQASite, find_gqa_sites

MIN_OPSET = 17
GQA_FORM = "gqa"  # AttentionSite.form of com.microsoft.GroupQueryAttention (RoPE fused inside: no q to observe)
MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
ORT_FACTOR = (
    1.5  # ONNX Runtime's peak over the weights' bytes, whole model: 1.33 measured at 6.1 GiB (docs/benchmarks.md)
)


def is_onnx(spec) -> bool:
    """Whether ``spec`` names an ONNX model: a ``.onnx`` file, or a directory holding ``model.onnx``."""
    if not isinstance(spec, (str, Path)):
        return False
    path = Path(spec)
    return path.suffix == ".onnx" or (path.is_dir() and (path / MODEL_FILE).is_file())


def model_path(spec: str | Path) -> Path:
    path = Path(spec)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise QpassError(f"{spec}: no such ONNX file; give a .onnx file or a directory holding {MODEL_FILE}")
    return path


def whole_model_memory(spec: str | Path) -> int | None:
    """Bytes ONNX Runtime needs to run the model whole, about: its initializers' bytes (external data by the lengths
    the graph gives, without reading it) times :data:`ORT_FACTOR`. None when ``spec`` is not a readable ONNX file
    (loading names the problem), or keeps every weight inside the protobuf (it is then under protobuf's 2 GiB, and
    a layer-by-layer run, which serializes the graph again, would hold those weights twice)."""
    import onnx

    path = Path(spec) / MODEL_FILE if Path(spec).is_dir() else Path(spec)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 (protobuf's DecodeError, OSError): load_decoder refuses it in one line
        return None
    external = [
        {entry.key: entry.value for entry in tensor.external_data}
        for tensor in proto.graph.initializer
        if tensor.external_data
    ]
    if not external:  # weights inside the protobuf (under its 2 GiB): layer by layer would hold them twice
        return None
    total = sum(int(entry.get("length", 0)) for entry in external)
    total += sum(tensor.ByteSize() for tensor in proto.graph.initializer if not tensor.external_data)
    return int(total * ORT_FACTOR)


def load_decoder(path: Path) -> tuple[ir.Model, list[tuple[AttentionSite, CacheIO | None]]]:
    """The model with shapes inferred (onnx-ir's ``ShapeInferencePass``) and its attention sites."""
    try:
        model = ir.load(path)
    except Exception as err:  # protobuf's DecodeError, OSError, onnx's own errors: the file is not a whole model
        raise QpassError(
            f"{path}: not a readable ONNX model ({type(err).__name__}: {_first_line(err)}); "
            "it is truncated or corrupt: export it again"
        ) from None
    if len(model.graph) == 0:
        raise QpassError(
            f"{path}: holds no ONNX graph ({path.stat().st_size} bytes); it is empty, truncated or not an ONNX "
            "model: export it again"
        )
    check_external_data(model, path)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < MIN_OPSET:
        raise QpassError(
            f"{path}: opset {opset}; qpass reads opset {MIN_OPSET} and above: export with opset_version>={MIN_OPSET}"
        )
    if "input_ids" not in {v.name for v in model.graph.inputs}:
        raise QpassError(
            f"{path}: no input_ids input (inputs: {', '.join(v.name for v in model.graph.inputs)}); "
            "export the decoder with token ids as input_ids"
        )
    logits_output(described(model.graph.outputs), str(path))  # the logits are one output: refused here if not
    ShapeInferencePass(strict_mode=False)(model)  # onnxruntime-genai's graphs carry shapes strict inference rejects
    from onnxscript.rewriter.pattern import MatchingTracer

    tracer = MatchingTracer()
    found = find_attention_sites(model, tracer) or [_gqa(site) for site in find_gqa_sites(model)]
    if not found:
        raise QpassError(
            f"{path}: found no attention ({', '.join(ATTENTION_PATTERNS)}, com.microsoft.GroupQueryAttention)"
            f"{_closest_miss(tracer)}; give a decoder whose attention is one of these"
        )
    return model, found


def _gqa(site: GQASite) -> tuple[AttentionSite, CacheIO | None]:
    """A GroupQueryAttention node as a site: K and V are observed as it writes them to the cache (``present.*``,
    after its fused RoPE); q stays inside the op."""
    cache = None
    if None not in (site.past_key, site.past_value, site.present_key, site.present_value):
        cache = CacheIO(site.past_key, site.past_value, site.present_key, site.present_value)
    attention = AttentionSite(
        layer=site.layer,
        attention=site.output,
        form=GQA_FORM,
        q="",
        k=site.present_key or "",
        v=site.present_value or "",
        num_heads=site.num_heads,
        num_kv_heads=site.kv_num_heads,
        head_dim=site.head_dim,
        rope=site.do_rotary,
        qk_norm=False,
        q_from="?",
        k_from="?",
        v_from="?",
    )
    return attention, cache


def passes_checker(model: ir.Model) -> bool:
    """Whether ``onnx.checker`` with ``full_check`` accepts the model (onnxruntime-genai's graphs carry ONNX Runtime's
    own ops in the default domain, which it rejects: for them, running in ONNX Runtime is the check)."""
    try:
        CheckerPass(full_check=True)(model)
    except Exception:  # noqa: BLE001 (onnx.checker's ValidationError and InferenceError alike)
        return False
    return True


def load_tokenizer(path: Path, tokenizer_dir: str | Path | None, model: ir.Model):
    """The tokenizer from ``tokenizer_dir``, or from the files next to the model; checked against the vocabulary."""
    where = Path(tokenizer_dir) if tokenizer_dir is not None else path.parent
    tokenizer = loaders.load_tokenizer(
        where, str(where), "give --tokenizer DIR with tokenizer.json / tokenizer_config.json"
    )  # the one loader: its failures, the tokenizers library's plain Exception included, in one line
    outputs = described(model.graph.outputs)
    dims = outputs[logits_output(outputs, str(path))][1]
    vocab = dims[-1] if dims else None
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise QpassError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's logits have {vocab}; "
            "give the tokenizer the model was trained with (--tokenizer DIR)"
        )
    return tokenizer


GENAI_NUMBERS = (
    "context_length",
    "vocab_size",
    "decoder.num_attention_heads",
    "decoder.num_key_value_heads",
    "decoder.head_size",
    "decoder.hidden_size",
    "decoder.num_hidden_layers",
)  # under "model", where present


def genai_config(path: Path) -> dict | None:
    """The ``genai_config.json`` next to the model (None without one), checked now, before any work: the ``model``
    and ``search`` objects the output's copy is written from, and each count it gives a positive integer."""
    config = path.parent / GENAI_CONFIG
    if not config.is_file():
        return None
    fix = "restore the file onnxruntime-genai's builder wrote"
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QpassError(f"{config}: not JSON ({err}); {fix}") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), dict) for k in ("model", "search")):
        raise QpassError(f"{config}: has no 'model' and 'search' objects, as onnxruntime-genai's config does; {fix}")
    for key in GENAI_NUMBERS:
        owner, _, name = ("model." + key).rpartition(".")
        section = doc["model"] if owner == "model" else doc["model"].get("decoder")
        if isinstance(section, dict) and name in section:
            value = section[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QpassError(f"{config}: model.{key} is {json.dumps(value)}, not a positive integer; {fix}")
    return doc


def _closest_miss(tracer) -> str:
    """What stopped the pattern that came closest (onnxscript's ``MatchingTracer``), for the error message."""
    best = max(
        (m for matches in tracer.best_matches_map.values() for m in matches), key=lambda m: m.score(), default=None
    )
    if best is None or not best.match_result.reason:
        return ""
    return f"; the closest miss: {best.match_result.reason}"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""
