"""Rewrite an ``ExportedProgram``'s graph on a copy, then rebuild a valid, saveable program from it."""

import copy

import torch
from torch._export.passes.lift_constants_pass import ConstantAttrMap, lift_constants_pass
from torch.export import ExportedProgram
from torch.fx import GraphModule


def graph_copy(program: ExportedProgram) -> GraphModule:
    """A graph module over a copy of ``program``'s graph, so passes leave ``program`` untouched."""
    return GraphModule(program.graph_module, copy.deepcopy(program.graph))


def rebuild(
    program: ExportedProgram, gm: GraphModule, state_dict: dict[str, torch.Tensor] | None = None
) -> ExportedProgram:
    """``program`` with ``gm``'s graph (and ``state_dict``, when passes changed parameter values).

    Tensors that passes attached to ``gm`` become lifted constants: ``torch.export``'s own lift pass
    turns each ``get_attr`` of a tensor into a ``CONSTANT_TENSOR`` input (a private API, pinned by the
    torch version in pyproject.toml). Inputs whose placeholder a pass erased (the float weights that
    W8A8 replaced) leave the signature and the state dict. The constructor runs the verifier.
    """
    signature = copy.deepcopy(program.graph_signature)
    placeholders = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    signature.input_specs = [spec for spec in signature.input_specs if spec.arg.name in placeholders]
    used = {spec.target for spec in signature.input_specs if spec.target is not None}
    state_dict = {k: v for k, v in (program.state_dict if state_dict is None else state_dict).items() if k in used}
    constants = lift_constants_pass(gm, signature, ConstantAttrMap())
    return ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=signature,
        state_dict=state_dict,
        range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph,
        example_inputs=program.example_inputs,
        constants={**program.constants, **constants},
        verifiers=program.verifiers,
    )
