"""GroupQueryAttention sites (qpass/passes/onnx/find_gqa_sites.py) of onnxruntime-genai's builder output: their
geometry and cache I/O from op types and wiring alone (structure), and none in a graph without the op (negative)."""

import onnx_ir as ir
import pytest

from qpass.passes.onnx.find_gqa_sites import GQASite, find_gqa_sites, gqa_nodes

HEAD_DIM, KV_HEADS, LAYERS = 16, 2, 2  # conftest's tiny Llama


@pytest.fixture(scope="module")
def float_model(genai_float_dir):
    return ir.load(genai_float_dir / "model.onnx")


def test_sites_of_the_builders_graph(float_model):
    sites = find_gqa_sites(float_model)
    assert sites == [
        GQASite(
            layer=i,
            node_name=f"/model/layers.{i}/attn/GroupQueryAttention",
            output=f"/model/layers.{i}/attn/GroupQueryAttention/output_0",
            past_key=f"past_key_values.{i}.key",
            past_value=f"past_key_values.{i}.value",
            present_key=f"present.{i}.key",
            present_value=f"present.{i}.value",
            num_heads=4,
            kv_num_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            do_rotary=True,
            packed_qkv=True,
        )
        for i in range(LAYERS)
    ]
    assert sites[0].kv_channels == KV_HEADS * HEAD_DIM


def test_sites_are_found_without_names(genai_float_dir):
    """Renamed nodes and intermediate values find the same geometry: the search reads op types and wiring."""
    model = ir.load(genai_float_dir / "model.onnx")
    for i, node in enumerate(model.graph):
        node.name = f"n{i}"
        for out in node.outputs:
            if not out.is_graph_output():
                out.name = f"v{i}_{out.index()}"
    sites = find_gqa_sites(model)
    assert [(s.layer, s.num_heads, s.kv_num_heads, s.head_dim, s.do_rotary) for s in sites] == [
        (0, 4, 2, 16, True),
        (1, 4, 2, 16, True),
    ]
    assert [s.node_name for s in sites] == [n.name for n in gqa_nodes(model.graph)]


def test_a_graph_without_gqa_has_no_sites():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 4]))
    node = ir.node("Relu", [x])
    node.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 20}), ir_version=10)
    assert find_gqa_sites(model) == []
