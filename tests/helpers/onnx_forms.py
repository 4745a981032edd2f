"""ONNX decoders in the forms people export them, for tests: conftest's tiny Llama exported with a fixed batch
(only the sequence axes dynamic), and :func:`qpass.models.onnx_export.export_decoder`'s export edited with onnx-ir:
``input_ids`` typed int32, the logits output renamed, the weights' external data moved out of the model's directory.

Each function writes a directory with ``model.onnx`` and the tokenizer, and returns it.
"""

import shutil
from pathlib import Path

import onnx
import onnx_ir as ir
import torch


def export_fixed_batch(model_dir: Path, out: Path, batch: int = 1, opset: int = 20) -> Path:
    """``model_dir`` exported as ``torch.onnx.export`` gives it when only the sequence axes are dynamic:
    ``input_ids [batch, sequence]``, ``past_key_values.* [batch, kv_heads, past_sequence, head_dim]``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qpass.models.onnx_export import _KVDecoder  # the wrapper qpass's own export uses, batch left static here

    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    config = model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    seq, past_len = 3, 2
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = tuple(torch.zeros(batch, kv_heads, past_len, head_dim) for _ in range(2 * layers))
    s, p, t = (torch.export.Dim(n) for n in ("sequence", "past_sequence", "total_sequence"))
    dynamic = ({1: s}, {1: t}, {1: s}, tuple({2: p} for _ in past))
    names = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    with torch.no_grad():
        program = torch.onnx.export(
            _KVDecoder(model).eval(),
            (ids, mask, positions, past),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic,
            input_names=["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in names)],
            output_names=["logits", *(f"present.{n}" for n in names)],
            verbose=False,
        )
    program.save(str(out / "model.onnx"))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def _copy(source: Path, out: Path) -> tuple[ir.Model, Path]:
    shutil.copytree(source, out)
    return ir.load(out / "model.onnx"), out / "model.onnx"


def with_int32_ids(source: Path, out: Path) -> Path:
    """``source``'s decoder with ``input_ids`` typed int32, cast to int64 where the graph reads it."""
    model, path = _copy(source, out)
    ids = next(v for v in model.graph.inputs if v.name == "input_ids")
    users = list(ids.uses())  # before the Cast reads it
    cast = ir.node("Cast", [ids], {"to": ir.DataType.INT64}, name="input_ids_int64")
    wide = cast.outputs[0]
    wide.name, wide.dtype, wide.shape = "input_ids_int64", ir.DataType.INT64, ids.shape
    for user, index in users:
        user.replace_input_with(index, wide)
    ids.dtype = ir.DataType.INT32
    model.graph.insert_before(model.graph.node(0), cast)
    ir.save(model, path)
    return out


def with_logits_named(source: Path, out: Path, name: str) -> Path:
    """``source``'s decoder with its logits output called ``name``."""
    model, path = _copy(source, out)
    next(v for v in model.graph.outputs if v.name == "logits").name = name
    ir.save(model, path)
    return out


def with_outputs_added(source: Path, out: Path, name: str) -> Path:
    """``source``'s decoder with its logits output called ``name`` and a second float ``[batch, sequence, vocab]``
    output beside it (the logits doubled): which one is the logits is then ambiguous."""
    model, path = _copy(source, out)
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    logits.name = name
    double = ir.node("Add", [logits, logits], name="doubled")
    value = double.outputs[0]
    value.name, value.dtype, value.shape = "doubled", logits.dtype, logits.shape
    model.graph.append(double)
    model.graph.outputs.append(value)
    ir.save(model, path)
    return out


def with_data_outside(source: Path, out: Path, location: str | None = None) -> Path:
    """``source``'s decoder with its weights as external data in ``w.bin`` beside ``out`` (``location`` ``../w.bin``),
    or at ``location`` as the model gives it (absolute)."""
    model, path = _copy(source, out)
    ir.save(model, path, external_data="model.onnx.data")
    where = Path(location) if location is not None else out.parent / "w.bin"
    shutil.move(out / "model.onnx.data", where)
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location if location is not None else "../w.bin"
    onnx.save(proto, str(path))
    return out
