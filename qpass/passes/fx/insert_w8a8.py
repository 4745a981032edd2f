"""W8A8: replace each quantized ``aten.linear`` by ``qpass::w8a8_linear`` with int8 weights as constants.

For a Linear ``y = x @ W^T + b`` with recipe activation qparams ``w8a8.<module>.input_scale`` /
``.input_offset`` ([1] each), the pass quantizes ``W [n, k]`` (symmetric, per output channel; from
the float, already smoothed, parameter values it is given) and writes

    y = w8a8_linear(x, input_scale [1], input_offset [1], weight int8 [n, k], quant_bias int32 [n],
                    deq_scale float32 [n])

so the program computes int8 x int8 -> int32 (see ``runtime/w8a8.py``). With dynamic activations
(``config.w8a8 == "dynamic"``, or a static recipe's ``w8a8.dynamic_linears``: each token's scale computed at run
time) it writes

    y = w8a8_dynamic_linear(x, weight int8 [n, k], weight_scale float32 [n], bias float32 [n])

The float weight and bias placeholders the graph no longer uses are erased; the pipeline drops them from the program's
signature and state dict when it rebuilds the program, so the saved program shrinks.
"""

import torch
from torch.fx import GraphModule

from qpass.core.errors import QpassError
from qpass.core.recipe import Recipe
from qpass.core.sites import LinearSite
from qpass.passes.fx.base import CountingPass
from qpass.passes.fx.patterns import W8A8_DYNAMIC_LINEAR, W8A8_LINEAR
from qpass.runtime.w8a8 import w8a8_dynamic_weights, w8a8_weights


class InsertW8A8Pass(CountingPass):
    """Rewrite every linear site the recipe quantizes (all but ``w8a8.float_linears``). In place.

    ``params``: placeholder name -> float tensor (the program's parameters with smoothing folded in).
    ``self.count`` counts the rewritten Linears; ``self.erased`` lists the placeholders removed.
    """

    recompile = True  # it erases placeholders, which the module's generated signature must lose too

    def __init__(self, sites: list[LinearSite], recipe: Recipe, params: dict[str, torch.Tensor]):
        super().__init__()
        self.sites, self.recipe, self.params = sites, recipe, params
        self.erased: list[str] = []

    def rewrite(self, gm: GraphModule) -> int:
        nodes = {n.name: n for n in gm.graph.nodes}
        floats = self.recipe.float_linears
        replaced = 0
        for i, site in enumerate(self.sites):
            if site.module in floats:
                continue
            bias = self.params[site.bias] if site.bias is not None else None
            if self.recipe.activations(site.module) == "dynamic":
                w = w8a8_dynamic_weights(self.params[site.weight], bias)
                consts = {"weight": w.weight, "weight_scale": w.weight_scale, "bias": w.bias}
                self._replace(gm, nodes[site.node], W8A8_DYNAMIC_LINEAR, consts, f"qpass_w8a8_{i}")
                replaced += 1
                continue
            if self.recipe.config.w8a8 == "dynamic":
                raise QpassError(
                    f"recipe: {site.module} is neither in w8a8.linears nor in w8a8.float_linears; recalibrate "
                    "this model with --w8a8 dynamic"
                )
            qparams = self.recipe.linear(site.module)
            if qparams is None:
                raise QpassError(
                    f"recipe: no W8A8 input qparams for {site.module}, and it is not in "
                    "w8a8.float_linears; recalibrate this model with --w8a8"
                )
            in_scale, in_offset = qparams
            w = w8a8_weights(self.params[site.weight], bias, float(in_scale), float(in_offset))
            consts = {
                "input_scale": w.input_scale,
                "input_offset": w.input_offset,
                "weight": w.weight,
                "quant_bias": w.quant_bias,
                "deq_scale": w.deq_scale,
            }
            self._replace(gm, nodes[site.node], W8A8_LINEAR, consts, f"qpass_w8a8_{i}")
            replaced += 1
        for site in self.sites:
            for name in (site.weight, site.bias):
                if name is not None and name in nodes and not nodes[name].users and name not in self.erased:
                    gm.graph.erase_node(nodes[name])
                    self.erased.append(name)
        return replaced

    @staticmethod
    def _replace(gm: GraphModule, linear: torch.fx.Node, op, consts: dict, name: str) -> None:
        """``linear`` -> ``op(x, *consts)``, the constants (in ``op``'s argument order) as buffers."""
        graph = gm.graph
        getters = {}
        for key, value in consts.items():
            gm.register_buffer(f"{name}_{key}", value.clone(memory_format=torch.contiguous_format))
            with graph.inserting_before(linear):
                getters[key] = graph.get_attr(f"{name}_{key}")
        with graph.inserting_before(linear):
            new = graph.call_function(op, (linear.args[0], *getters.values()))
        new.meta = dict(linear.meta)  # same output value: [..., n] in x's dtype
        for g in getters.values():
            g.meta["nn_module_stack"] = dict(linear.meta.get("nn_module_stack", {}))
            g.meta["stack_trace"] = linear.meta.get("stack_trace")
        linear.replace_all_uses_with(new)
        graph.erase_node(linear)
