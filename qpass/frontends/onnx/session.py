"""Running an ONNX decoder in ONNX Runtime: sessions, the feeds of a window batch, greedy decoding.

A decoder here has ``input_ids [B, S]``, optionally ``attention_mask [B, past + S]`` and
``position_ids [B, S]``, and ``past_key_values.<i>.key/value [B, kv_heads, past, head_dim]`` inputs;
``logits [B, S, vocab]`` and ``present.<i>.key/value`` outputs (the cache with the new tokens).
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


class Feeds:
    """The feeds of a decoder's graph inputs for a batch of token ids: ``input_ids``, ``attention_mask`` and
    ``position_ids`` where the graph has them, and the ``past_key_values.*`` given, or empty."""

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

    @classmethod
    def of_graph(cls, graph: ir.Graph, sites: list[dict]) -> "Feeds":
        """The feeds of an onnx-ir graph's inputs (typed as ONNX Runtime would report them)."""
        inputs = {}
        for value in graph.inputs:
            kind = (
                f"tensor({value.dtype.name.lower()})" if value.dtype is not None else "untyped"
            )  # ONNX Runtime's names
            dims = [] if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]
            inputs[value.name] = (kind, dims)
        return cls(inputs, sites)

    def __call__(self, ids: np.ndarray, past: dict[str, np.ndarray] | None, start: int) -> dict[str, np.ndarray]:
        batch, seq = ids.shape
        feeds = {"input_ids": ids.astype(np.int64)}
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
    """Feeds and runs one session: ``logits(ids)`` over whole windows, ``step`` for decoding."""

    def __init__(self, sess, sites: list[dict], outputs: list[str] | None = None):
        """``sites``: the site documents, as :class:`Feeds` takes them; ``outputs``: values fetched after the logits."""
        self.sess = sess
        self.feeds = Feeds({i.name: (i.type, i.shape) for i in sess.get_inputs()}, sites)
        self.pasts = self.feeds.pasts
        self.presents = [PRESENT_PREFIX + name[len(PAST_PREFIX) :] for name in self.pasts]
        self.outputs = ["logits", *(outputs or [])]

    def run(self, ids: torch.Tensor) -> list[np.ndarray]:
        """``[logits, *outputs]`` of token ids ``[B, S]`` with an empty past."""
        return self.sess.run(self.outputs, self.feeds(ids.numpy(), None, 0))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(ids)[0])

    def step(self, ids: np.ndarray, past: dict | None, start: int) -> tuple[np.ndarray, dict]:
        """One forward of ``ids [1, S]`` after ``start`` cached tokens: ``(logits [1, S, vocab], the new cache)``."""
        out = self.sess.run(["logits", *self.presents], self.feeds(ids, past, start))
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
