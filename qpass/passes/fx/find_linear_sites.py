"""Find the Linears W8A8 quantizes, and the smoothing groups around them, from the graph's ops alone.

A linear site is an ``aten.linear`` whose weight is a parameter placeholder; the model's head (the
Linear whose output reaches the graph output through layout ops only, lm_head) is left out. A
smoothing group is a set of Linears sharing one input ``X [..., C]`` together with what produces
``X`` channel by channel, so dividing ``X`` by a per-channel scale can be folded upstream:

- ``norm``: ``X = mul(norm_weight [C], normalized)`` (RMSNorm / LayerNorm without bias), and every
  user of ``X`` is a quantized Linear (input_layernorm -> q, k, v; post_attention_layernorm -> gate, up);
- ``linear``: ``X`` is another Linear's output reached only through layout ops, the value input of
  attention in any spelling (softmax-weighted sums commute with per-channel scaling; GQA's repeat gives
  ``group`` > 1), or one operand of an elementwise ``mul`` (v_proj -> o_proj; up_proj -> down_proj in a
  gated MLP).

Names (HF module paths) only label the result; nothing is decided from them.
"""

from torch.fx import Graph, Node

from qpass.core.sites import LinearSite, SmoothGroup
from qpass.passes.fx.patterns import CHECKS, LAYOUT, LINEAR, aten, match_attention, match_linear


def find_linear_sites(graph: Graph, param_names: dict[str, str]) -> list[LinearSite]:
    """The Linears of ``graph`` to quantize, in graph order; ``param_names``: placeholder -> parameter name."""
    sites = []
    for node in graph.nodes:
        match = match_linear(node)
        if match is None or _is_head(node):
            continue
        x, w, b = match
        if w.op != "placeholder" or w.name not in param_names or not param_names[w.name].endswith(".weight"):
            continue
        if b is not None and (b.op != "placeholder" or b.name not in param_names):
            continue
        out_features, in_features = w.meta["val"].shape
        sites.append(
            LinearSite(
                node.name,
                x.name,
                w.name,
                b.name if b is not None else None,
                param_names[w.name].removesuffix(".weight"),
                int(in_features),
                int(out_features),
            )
        )
    return sites


def find_smoothing_groups(graph: Graph, sites: list[LinearSite], param_names: dict[str, str]) -> list[SmoothGroup]:
    """The smoothing groups among ``sites``, in graph order of their inputs."""
    nodes = {n.name: n for n in graph.nodes}
    attention = {m.output: m for n in graph.nodes if (m := match_attention(n)) is not None}
    by_node = {s.node: s for s in sites}
    by_input: dict[str, list[LinearSite]] = {}
    for s in sites:
        by_input.setdefault(s.input, []).append(s)
    groups = []
    for input_name, consumers in by_input.items():
        x = nodes[input_name]
        real_users = [u for u in x.users if u.target not in CHECKS]
        if any(u.name not in by_node for u in real_users):
            continue  # X also feeds something that is not a quantized Linear: scaling it would change that
        names = tuple(c.module for c in consumers)
        channels = consumers[0].in_features
        norm = _norm_weight(x, param_names, channels)
        if norm is not None:
            groups.append(SmoothGroup(input_name, norm.removesuffix(".weight"), "norm", names, channels))
            continue
        found = _producing_linear(x, attention)
        if found is None or found[0].name not in by_node:
            continue
        prev, head_dim = by_node[found[0].name], found[1]
        if channels % prev.out_features:
            continue
        group = channels // prev.out_features
        if group > 1 and head_dim is None:
            continue  # channels repeat, but not through attention's per-head repeat: layout unknown
        groups.append(
            SmoothGroup(
                input_name, prev.module, "linear", names, prev.out_features, group, head_dim if group > 1 else None
            )
        )
    return groups


def _is_head(linear: Node) -> bool:
    """The Linear's output reaches the graph output through layout ops only (the LM head)."""
    frontier = [linear]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.op == "output":
                return True
            if user.target in LAYOUT:
                frontier.append(user)
    return False


def _norm_weight(x: Node, param_names: dict[str, str], channels: int) -> str | None:
    """``x = mul(weight [C], normalized)``: the weight's parameter name."""
    if x.target is not aten.mul.Tensor:
        return None
    for a, b in (x.args, x.args[::-1]):
        if (
            isinstance(a, Node)
            and a.op == "placeholder"
            and a.name in param_names
            and isinstance(b, Node)
            and tuple(a.meta["val"].shape) == (channels,)
            and _normalized(b)
        ):
            return param_names[a.name]
    return None


def _normalized(x: Node, depth: int = 6) -> bool:
    """``x`` is ``h * rsqrt(...)`` (RMSNorm) or a layer_norm, possibly through casts."""
    for _ in range(depth):
        if x.target in (aten.layer_norm.default, aten.native_layer_norm.default):
            return True
        if x.target is aten.mul.Tensor:
            return any(isinstance(a, Node) and a.target is aten.rsqrt.default for a in x.args)
        if x.target not in LAYOUT or not isinstance(x.args[0], Node):
            return False
        x = x.args[0]
    return False


def _producing_linear(x: Node, attention: dict) -> tuple[Node, int | None] | None:
    """Walk back from ``x`` to the Linear producing its channels: ``(linear, head_dim)`` or None.

    Every node on the way must have a single user, so scaling the Linear's output changes nothing else.
    ``head_dim`` is the last dim of attention's value input, when the path goes through attention
    (any spelling of the shared table; ``attention`` maps each attention output node to its match).
    """
    head_dim = None
    node = x
    while True:
        if node is not x and len([u for u in node.users if u.target not in CHECKS]) != 1:
            return None
        if node.target is LINEAR:
            return node, head_dim
        if node.target in LAYOUT:
            node = node.args[0]
        elif node in attention:
            value = attention[node].v
            head_dim = int(value.meta["val"].shape[-1])
            node = value
        elif node.target is aten.mul.Tensor:
            tensor_args = [a for a in node.args if isinstance(a, Node)]
            linear_args = [a for a in tensor_args if _reaches_linear_by_layout(a)]
            if len(tensor_args) != 2 or len(linear_args) != 1:
                return None
            node = linear_args[0]
        else:
            return None
        if not isinstance(node, Node):
            return None


def _reaches_linear_by_layout(x: Node) -> bool:
    while x.target in LAYOUT:
        x = x.args[0]
    return x.target is LINEAR
