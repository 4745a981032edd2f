"""Running an ONNX decoder in ONNX Runtime one layer at a time: the graph cut into one stage per attention site, each
stage's session made, run and dropped before the next, so that a model larger than memory runs.

ONNX Runtime holds every weight of the graph it runs. The cut:
- stage ``i`` holds the nodes that attention site ``i`` needs and no earlier site does (its anchor is the node making
  the site's attention output): the embedding, masks and rotary tables go to stage 0, and each decoder layer's MLP to
  the stage of the next layer's attention;
- nodes that no site needs (the last MLP, the final norm, the LM head, the ``present.*`` outputs) go to the first stage
  where all they read is made, and nodes that read only graph inputs and constants to the first stage that uses them;
- a value one stage makes and a later one reads is an output of the first and an input of the second (two of them
  where onnxruntime-genai fuses the residual into ``SkipSimplifiedLayerNormalization``); graph inputs go to every
  stage that reads them, initializers to every stage that uses them.

Weights kept as external data stay there: ONNX Runtime is given the data file memory-mapped and copies only that
stage's tensors. The cut is on ``onnx`` protos, whose node order is the graph's (topological).
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

from qpass.core.errors import QpassError
from qpass.core.memory import trim_heap


@dataclass(frozen=True)
class Stage:
    """One stage: its nodes (positions in ``graph.node``), the values it reads from graph inputs and earlier stages,
    the values it makes that later stages read (and the graph outputs it makes), and the initializers it uses."""

    nodes: tuple[int, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    initializers: tuple[str, ...]


def split(graph: onnx.GraphProto, anchors: list[str]) -> list[Stage]:
    """The stages of ``graph``, one per anchor (the name of the value each attention site's node makes), in order."""
    producer = {name: j for j, node in enumerate(graph.node) for name in node.output if name}
    missing = [name for name in anchors if name not in producer]
    if missing:
        raise QpassError(f"layer by layer: no node of the ONNX graph makes {missing[0]}; please report this model")
    reads = [_reads(node) for node in graph.node]
    stage: list[int | None] = [None] * len(graph.node)
    for i, anchor in enumerate(anchors):  # in site order: a node keeps the first (earliest) site that needs it
        stack = [producer[anchor]]
        while stack:
            j = stack.pop()
            if stage[j] is None:
                stage[j] = i
                stack.extend(producer[name] for name in reads[j] if name in producer)
    consumers: list[list[int]] = [[] for _ in graph.node]
    for j, names in enumerate(reads):
        for name in names:
            if name in producer:
                consumers[producer[name]].append(j)
    deferred = set()
    for j in range(len(graph.node)):  # topological order: every producer's stage is known
        if stage[j] is None:
            made = [stage[producer[name]] for name in reads[j] if name in producer and producer[name] not in deferred]
            if made:
                stage[j] = max(made)
            else:
                deferred.add(j)  # reads graph inputs and constants only: placed with its first reader
    last = len(anchors) - 1
    for j in sorted(deferred, reverse=True):  # reverse topological order: consumers first
        stage[j] = min((stage[c] for c in consumers[j]), default=last)
    return _stages(graph, stage, reads, producer, len(anchors))


def _stages(graph, stage, reads, producer, count: int) -> list[Stage]:
    graph_inputs = {value.name for value in graph.input}
    initializers = {tensor.name for tensor in graph.initializer}
    nodes = [[] for _ in range(count)]
    inputs = [dict() for _ in range(count)]  # dicts as ordered sets: the order is the graph's, so the same every run
    outputs = [dict() for _ in range(count)]
    used = [dict() for _ in range(count)]
    for j, names in enumerate(reads):
        s = stage[j]
        nodes[s].append(j)
        for name in names:
            if name in producer and stage[producer[name]] != s:
                inputs[s][name] = None
                outputs[stage[producer[name]]][name] = None
            elif name in initializers:
                used[s][name] = None
            elif name in graph_inputs:
                inputs[s][name] = None
    for value in graph.output:
        if value.name not in producer:
            raise QpassError(
                f"layer by layer: the ONNX graph's output {value.name} is not made by a node; please report this model"
            )
        outputs[stage[producer[value.name]]][value.name] = None
    return [Stage(tuple(nodes[s]), tuple(inputs[s]), tuple(outputs[s]), tuple(used[s])) for s in range(count)]


def _reads(node: onnx.NodeProto) -> list[str]:
    """The values ``node`` reads: its inputs, and the outer values its subgraphs (``If``, ``Loop``, ``Scan``) read."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            names += _outer_reads(graph)
    return list(dict.fromkeys(names))


def _outer_reads(graph: onnx.GraphProto) -> list[str]:
    made = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    names = []
    for node in graph.node:
        names += [name for name in _reads(node) if name not in made]
        made.update(node.output)
    return names


def stage_model(
    model: onnx.ModelProto, stage: Stage, outputs: Iterable[str], types: dict[str, onnx.TypeProto]
) -> onnx.ModelProto:
    """The model of ``stage``: its nodes and initializers, its ``inputs`` typed from ``types`` (value name -> type),
    and ``outputs`` (any values the stage makes) as graph outputs, typed where ``types`` knows them."""
    graph = model.graph
    untyped = [name for name in stage.inputs if name not in types]
    if untyped:
        raise QpassError(
            f"layer by layer: the ONNX graph gives no type for {untyped[0]}, which crosses a layer boundary; "
            "please report this model"
        )
    initializers = set(stage.initializers)
    sub = onnx.helper.make_graph(
        [graph.node[j] for j in stage.nodes],
        f"{graph.name}_stage",
        [_value_info(name, types[name]) for name in stage.inputs],
        [_value_info(name, types.get(name)) for name in dict.fromkeys(outputs)],
        [tensor for tensor in graph.initializer if tensor.name in initializers],
    )
    out = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name, graph=sub)
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    return out


def _value_info(name: str, kind: onnx.TypeProto | None) -> onnx.ValueInfoProto:
    info = onnx.ValueInfoProto(name=name)
    if kind is not None:
        info.type.CopyFrom(kind)
    return info


def value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Every typed value of ``model``'s graph: inputs, outputs, ``value_info`` and initializers."""
    graph = model.graph
    types = {
        value.name: value.type
        for value in [*graph.input, *graph.output, *graph.value_info]
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type
    }
    for tensor in graph.initializer:
        types.setdefault(tensor.name, onnx.helper.make_tensor_type_proto(tensor.data_type, None))
    return types


def run_stages(model: onnx.ModelProto, stages: list[Stage], base_dir: Path, fetch, use) -> Iterator[int]:
    """``use(index, session, outputs)`` for each stage in turn, ``fetch(index, stage)`` naming the outputs (values the
    stage makes) its session is built with; a stage with none is skipped. Yields each stage's index when it is done.
    Each session is dropped when ``use`` returns, before the next is made (``use`` keeps none), and its memory given
    back to the system, so one stage's weights are held at a time. Values crossing a boundary without a type in the
    graph (outputs of ONNX Runtime's own ops, which ``onnx`` shape inference does not know) are typed as ONNX Runtime
    inferred them in the stage that made them."""
    types = value_types(model)
    for index, stage in enumerate(stages):
        outputs = list(dict.fromkeys(fetch(index, stage)))
        if not outputs:
            continue
        session = stage_session(stage_model(model, stage, outputs, types), base_dir)
        # names and type strings only: an ONNX Runtime NodeArg keeps its session alive
        inferred = {value.name: value.type for value in session.get_outputs()}
        for name, kind in inferred.items():
            elem = (
                getattr(onnx.TensorProto, kind[len("tensor(") : -1].upper(), None)
                if kind.startswith("tensor(")
                else None
            )
            if name not in types and elem is not None:
                types[name] = onnx.helper.make_tensor_type_proto(elem, None)
        use(index, session, outputs)
        del session
        trim_heap()
        yield index


def stage_session(model: onnx.ModelProto, base_dir: Path):
    """An ONNX Runtime CPU session of a stage's model. Its external data (locations relative to ``base_dir``, the input
    model's directory) is given to ONNX Runtime as memory-mapped files, of which it copies only this stage's tensors
    (it will not read a data file outside the directory of the model it loads)."""
    import mmap

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    locations = sorted(
        {entry.value for tensor in model.graph.initializer for entry in tensor.external_data if entry.key == "location"}
    )
    maps = []
    try:
        for location in locations:
            with open(base_dir / location, "rb") as file:
                maps.append(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))
        if maps:
            options.add_external_initializers_from_files_in_memory(locations, maps, [len(m) for m in maps])
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except OSError as err:
        raise QpassError(
            f"layer by layer: cannot read the model's external data ({err.strerror}: {err.filename}); "
            "keep the data file next to the model, as it was exported"
        ) from None
    except Exception as err:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeException types
        raise QpassError(
            f"layer by layer: ONNX Runtime cannot load a layer of the model ({str(err).splitlines()[0][:300]}); "
            "give a model ONNX Runtime can run"
        ) from None
    finally:
        for m in maps:
            m.close()
