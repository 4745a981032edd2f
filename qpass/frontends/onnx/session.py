"""Running an ONNX decoder in ONNX Runtime: sessions, the feeds of a window batch, greedy decoding.

A decoder here has ``input_ids [B, S]`` (int64 or int32), optionally ``attention_mask [B, past + S]`` and
``position_ids [B, S]``, and ``past_key_values.<i>.key/value [B, kv_heads, past, head_dim]`` inputs;
``logits [B, S, vocab]`` (under that name, or the one float output of rank 3 besides the cache) and
``present.<i>.key/value`` outputs (the cache with the new tokens). ``B`` is dynamic, or fixed by the export (a
``torch.onnx.export`` with only the sequence axes dynamic gives 1): a batch is then run in runs of that size.
Whole windows run with an empty past; decoding feeds each step's ``present.*`` back as ``past_key_values.*``.
"""

import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from qpass.core.errors import QpassError

IN_MEMORY_BYTES = 1 << 30  # models with more initializer bytes go to ONNX Runtime through a file with external data
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
ID_TYPES = ("tensor(int64)", "tensor(int32)")  # what input_ids may be: the window ids are cast to it
FLOATS = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)")


def session(source: ir.Model | Path, threads: int | None = None):
    """An ONNX Runtime CPU session of an onnx-ir model (serialized in memory, or through a temporary file when it is
    large or reads external data) or of a file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if isinstance(source, Path):
        return _session(ort, str(source), options, source)
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in source.graph.initializers.values())
    if not external and initializer_bytes(source) <= IN_MEMORY_BYTES:  # external tensors would stay references
        return _session(ort, ir.to_proto(source).SerializeToString(), options, "the rewritten model")
    with tempfile.TemporaryDirectory(prefix="qpass-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(source, path, external_data="model.onnx.data")
        return _session(ort, str(path), options, "the rewritten model")


def _session(ort, model, options, what):
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeException types
        raise QpassError(
            f"{what}: ONNX Runtime cannot load it ({str(err).splitlines()[0][:300]}); give a model ONNX Runtime can run"
        ) from None


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def described(values) -> dict[str, tuple[str, list]]:
    """Each onnx-ir value as ONNX Runtime describes a graph input or output: ``name -> (type, dims)``, the type as
    ``tensor(float)``, a symbolic dim by its name."""
    return {
        value.name: (
            f"tensor({value.dtype.name.lower()})" if value.dtype is not None else "untyped",
            [] if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape],
        )
        for value in values
    }


def logits_output(outputs: dict[str, tuple[str, list]], what: str = "the ONNX model") -> str:
    """The name of the graph output holding the logits ``[batch, sequence, vocab]`` among ``outputs`` (as
    :func:`described` gives them): ``logits`` where there is one, else the one float output of rank 3 that is not a
    ``present.*`` cache (``output_0``, ``lm_logits``); refused in one line naming the outputs where that is not one."""
    if "logits" in outputs:
        return "logits"
    found = [
        name
        for name, (kind, dims) in outputs.items()
        if not name.startswith(PRESENT_PREFIX) and kind in FLOATS and len(dims or []) == 3
    ]
    if len(found) != 1:
        which = f"{' and '.join(found)} could each be" if found else "none of them is"
        raise QpassError(
            f"{what}'s outputs are {', '.join(outputs)}, and {which} its logits (a float "
            "[batch, sequence, vocab] output besides the present.* cache); name the logits output logits, "
            "or export the decoder with no other such output"
        )
    return found[0]


def runs(feeds: dict[str, np.ndarray], batch: int | None) -> list[tuple[dict[str, np.ndarray], int]]:
    """``feeds`` (each ``[B, ...]``) as the runs a graph that fixes its batch at ``batch`` takes: ``[(feeds of
    batch rows, how many are real)]``, the last run filled up by repeating its last row, whose copies' outputs are
    dropped (the windows are independent: a row's numbers are its own whatever runs beside it); ``feeds`` whole
    where the batch is dynamic."""
    total = len(feeds["input_ids"])
    if batch is None or total == batch:
        return [(feeds, total)]
    parts = []
    for start in range(0, total, batch):
        part = {name: value[start : start + batch] for name, value in feeds.items()}
        rows = len(part["input_ids"])
        if rows < batch:
            part = {
                name: np.concatenate([value, np.repeat(value[-1:], batch - rows, axis=0)])
                for name, value in part.items()
            }
        parts.append((part, rows))
    return parts


class Feeds:
    """The feeds of a decoder's graph inputs for a batch of token ids: ``input_ids`` (of the graph's integer type),
    ``attention_mask`` and ``position_ids`` where the graph has them, and the ``past_key_values.*`` given, or empty.
    ``batch``: the batch the graph fixes (``input_ids``' first dim), None where it is dynamic."""

    def __init__(self, inputs: dict[str, tuple[str, list]], sites: list[dict]):
        """``inputs``: each graph input's ONNX Runtime type (``tensor(float)``) and shape; ``sites``: the site documents
        (:func:`qpass.frontends.onnx.pipeline.site_doc`), whose cache heads and head_dim size the empty past where the
        graph leaves them symbolic (onnxruntime-genai's ``kv_cache_dim``)."""
        self.inputs = inputs
        self.cache_dims = {
            s[name]: (s["num_kv_heads"], s["head_dim"])
            for s in sites
            for name in ("past_key", "past_value")
            if s.get(name)
        }
        self.pasts = [name for name in inputs if name.startswith(PAST_PREFIX)]
        unknown = set(inputs) - {"input_ids", "attention_mask", "position_ids", *self.pasts}
        if "input_ids" not in inputs or unknown:
            raise QpassError(
                f"the ONNX model's inputs are {', '.join(inputs)}; qpass runs decoders with input_ids, "
                "optionally attention_mask and position_ids, and past_key_values.<i>.key/value: export it so"
            )
        kind, dims = inputs["input_ids"]
        if kind not in ID_TYPES:
            raise QpassError(
                f"the ONNX model's input_ids is {kind}; qpass feeds token ids as {' or '.join(ID_TYPES)}: export "
                "the decoder with integer token ids"
            )
        self.batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None

    @classmethod
    def of_graph(cls, graph: ir.Graph, sites: list[dict]) -> "Feeds":
        """The feeds of an onnx-ir graph's inputs (typed as ONNX Runtime would report them)."""
        return cls(described(graph.inputs), sites)

    def __call__(self, ids: np.ndarray, past: dict[str, np.ndarray] | None, start: int) -> dict[str, np.ndarray]:
        batch, seq = ids.shape
        kind = self._dtype("input_ids")
        if ids.size and not np.iinfo(kind).min <= ids.min() <= ids.max() <= np.iinfo(kind).max:
            raise QpassError(
                f"token id {ids.max()} does not fit the ONNX model's {self.inputs['input_ids'][0]} input_ids; "
                "export the decoder with int64 input_ids"
            )
        feeds = {"input_ids": ids.astype(kind)}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((batch, start + seq), dtype=self._dtype("attention_mask"))
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(start, start + seq), (batch, seq)).astype(
                self._dtype("position_ids")
            )
        for name in self.pasts:
            if past is not None:
                feeds[name] = past[name]
                continue
            shape = self.inputs[name][1]  # [B, kv_heads, past, head_dim]
            heads, head_dim = self.cache_dims.get(name, (shape[1], shape[3]) if len(shape) == 4 else (None, None))
            if not all(isinstance(d, int) for d in (heads, head_dim)):
                raise QpassError(
                    f"the ONNX model's input {name} has shape {shape} and no attention site reads it; "
                    "its heads and head_dim must be static"
                )
            feeds[name] = np.zeros((batch, heads, 0, head_dim), dtype=self._dtype(name))
        return feeds

    def _dtype(self, name: str):
        kind = self.inputs[name][0]
        if kind not in _NUMPY:
            raise QpassError(f"the ONNX model's input {name} is {kind}; qpass feeds {', '.join(_NUMPY)}")
        return _NUMPY[kind]


class Runner:
    """Feeds and runs one session: ``logits(ids)`` over whole windows, ``step`` for decoding; any batch, in runs
    of the batch the graph fixes where it fixes one (:func:`runs`)."""

    def __init__(self, sess, sites: list[dict], outputs: list[str] | None = None):
        """``sites``: the site documents, as :class:`Feeds` takes them; ``outputs``: values fetched after the logits
        (each ``[B, ...]``)."""
        self.sess = sess
        self.feeds = Feeds({i.name: (i.type, i.shape) for i in sess.get_inputs()}, sites)
        self.pasts = self.feeds.pasts
        self.presents = [PRESENT_PREFIX + name[len(PAST_PREFIX) :] for name in self.pasts]
        extra = set(outputs or [])
        self.logits_name = logits_output({o.name: (o.type, o.shape) for o in sess.get_outputs() if o.name not in extra})
        self.outputs = [self.logits_name, *(outputs or [])]

    def run(self, ids: torch.Tensor) -> list[np.ndarray]:
        """``[logits, *outputs]`` of token ids ``[B, S]`` with an empty past."""
        return self._run(self.outputs, self.feeds(ids.numpy(), None, 0))

    def _run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The session's ``names`` for ``feeds``, run in the runs :func:`runs` cuts, concatenated."""
        parts = [[value[:rows] for value in self.sess.run(names, feed)] for feed, rows in runs(feeds, self.feeds.batch)]
        return parts[0] if len(parts) == 1 else [np.concatenate(values) for values in zip(*parts)]

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(ids)[0])

    def step(self, ids: np.ndarray, past: dict | None, start: int) -> tuple[np.ndarray, dict]:
        """One forward of ``ids [1, S]`` after ``start`` cached tokens: ``(logits [1, S, vocab], the new cache)``."""
        out = self._run([self.logits_name, *self.presents], self.feeds(ids, past, start))
        return out[0], dict(zip(self.pasts, out[1:]))


def greedy(runner: Runner, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding: the prompt in one forward, then one token per step on the cache the model returns."""
    if not prompt:
        raise QpassError("--prompt: the prompt has no tokens; give some text")
    logits, past = runner.step(np.array([prompt], dtype=np.int64), None, 0)
    new, length = [], len(prompt)
    while len(new) < max_new_tokens:
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token == eos_token_id:
            break
        logits, past = runner.step(np.array([[token]], dtype=np.int64), past, length)
        length += 1
    return new
