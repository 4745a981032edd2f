"""An ONNX decoder run one layer at a time over every window (``--layerwise``), for models larger than memory.

The graph is cut into one stage per attention site (:mod:`qpass.ort.stages`). Each stage's ONNX
Runtime session is made, run over every window batch and dropped before the next, so only one stage's weights are
held; the values that cross a stage boundary (the residual stream, the attention output, masks and rotary tables)
are kept for every batch until their last reader has run (a :class:`~qpass.core.spill.Spill`: in memory up to a
budget, past it in temporary files).
The values observed (site q/k/v, the int8 cache) are handed to their callbacks as their stage makes them, in batch
order, as a whole-model run hands them over.
"""

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from tqdm.auto import tqdm

from qpass.core.errors import QpassError
from qpass.core.evaluate import Score, batch_nll
from qpass.core.memory import hidden_budget
from qpass.core.spill import Spill
from qpass.frontends.onnx.session import Feeds, described, logits_output, runs
from qpass.ort.stages import run_stages, split


class LayerwiseModel:
    """``model`` (an onnx-ir decoder, its weights external data under ``base_dir`` or in memory) cut at ``attention``
    (the value each site's attention makes)."""

    def __init__(self, model: ir.Model, sites: list[dict], attention: list[str], base_dir: Path):
        self.spilled = False  # whether a run kept boundary values in temporary files (past a quarter of the memory)
        self.proto = ir.to_proto(model)  # external tensors stay references into their file: nothing is read
        self.base_dir = base_dir
        self.stages = split(self.proto.graph, attention)
        self.feeds = Feeds.of_graph(model.graph, sites)
        self.logits = logits_output(described(model.graph.outputs))
        self.made = {
            name: index
            for index, stage in enumerate(self.stages)
            for j in stage.nodes
            for name in self.proto.graph.node[j].output
            if name
        }
        self.last_read = {}
        for index, stage in enumerate(self.stages):
            for name in stage.inputs:
                if name in self.made:
                    self.last_read[name] = index

    def window_nll(
        self,
        windows: torch.Tensor,
        batch_size: int,
        desc: str,
        observe: dict[str, Callable[[np.ndarray], None]] | None = None,
        nll: bool = True,
        score: Score | None = None,
    ) -> torch.Tensor | None:
        """The mean next-token NLL (or ``score``) of each of ``windows [N, W]`` (float64 ``[N]``, None unless ``nll``),
        and ``observe[name](value)`` for each batch's value of each name observed."""
        result = [] if nll else None
        for _ in self.run(windows, batch_size, desc, observe, result, score or batch_nll):
            pass
        return torch.cat(result) if nll else None

    def run(
        self,
        windows: torch.Tensor,
        batch_size: int,
        desc: str,
        observe: dict[str, Callable[[np.ndarray], None]] | None = None,
        nll: list | None = None,
        score: Score = batch_nll,
    ) -> Iterator[int]:
        """Runs every stage over ``windows``, yielding each stage's index once it is done (and its session gone):
        ``observe[name](value)`` for each batch's value of each name observed, and each batch's NLL (its ``score``)
        appended to ``nll`` where it is a list. A graph that fixes its batch runs in batches of that size instead, the
        last filled up (:func:`qpass.frontends.onnx.session.runs`), the copies' values dropped."""
        observe = observe or {}
        unknown = [name for name in observe if name not in self.made]
        if unknown:
            raise QpassError(f"layer by layer: no node of the ONNX graph makes {unknown[0]}; please report this model")
        batches = list(windows.split(self.feeds.batch or batch_size))
        graph_feeds = [runs(self.feeds(batch.numpy(), None, 0), self.feeds.batch)[0][0] for batch in batches]
        kept = Spill(hidden_budget(None), prefix="qpass-stages-")

        def fetch(index, stage) -> list[str]:
            wanted = [
                name for name in stage.outputs if name in self.last_read or (nll is not None and name == self.logits)
            ]
            return wanted + [name for name in observe if self.made[name] == index]

        def use(index, session, outputs) -> None:
            stage = self.stages[index]
            for b, batch in enumerate(batches):
                feed = {name: kept.get(name, b) if name in kept else graph_feeds[b][name] for name in stage.inputs}
                try:
                    values = session.run(outputs, feed)
                except Exception as err:  # onnxruntime's own Fail / RuntimeException types (out of memory among them)
                    raise QpassError(
                        f"layer by layer: ONNX Runtime failed on layer {index} of {len(self.stages)} "
                        f"({str(err).splitlines()[0][:300]}); a smaller --batch-size needs less memory"
                    ) from None
                for name, value in zip(outputs, values):
                    if name in self.last_read:
                        kept.put(name, b, value)
                    if name in observe:
                        observe[name](value[: len(batch)])
                    if name == self.logits and nll is not None:
                        nll.append(score(torch.from_numpy(value[: len(batch)]), batch, b))
            for name in [name for name in kept.names() if self.last_read[name] == index]:
                kept.drop(name)

        with (
            kept,
            torch.no_grad(),
            tqdm(total=len(self.stages), desc=f"{desc} (layer-wise)", unit="layer", leave=False, disable=None) as bar,
        ):
            for index in run_stages(self.proto, self.stages, self.base_dir, fetch, use):
                bar.update(1)
                self.spilled |= kept.directory is not None
                yield index
