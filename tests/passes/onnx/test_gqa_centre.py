"""Centring K and V in the graph (qpass/passes/onnx/gqa_centre.py), which carries an asymmetric recipe through
GroupQueryAttention's symmetric int8 cache: on its own (no int8) the centred float model gives the original's
logits and caches the centred K and V, which holds only with K's centre rotated by GQA's own positions.
QuantizeGQAKVCachePass with the centring: test_quantize_gqa_kv_cache.py."""

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from qpass.passes.onnx.find_gqa_sites import find_gqa_sites, gqa_nodes
from qpass.passes.onnx.gqa_centre import Positions, centre
from tests.helpers.onnx_genai_cases import empty_cache, forward, session

HEAD_DIM, KV_HEADS, LAYERS = 16, 2, 2  # conftest's tiny Llama
VOCAB = 49152


@pytest.fixture(scope="module")
def float_sess(genai_float_dir):
    return session(genai_float_dir / "model.onnx")


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(2).integers(0, VOCAB, (1, 24))


def centred_float(model_dir, centres, tmp_path, rotate: bool = True):
    """A session of the float model with K and V centred (no int8: the centring alone), or, not ``rotate``, with
    K's centre subtracted before RoPE unrotated (what the centring would be without GQA's positions)."""
    model = ir.load(model_dir / "model.onnx")
    positions = Positions(model.graph)
    for node, site, (k, v) in zip(gqa_nodes(model.graph), find_gqa_sites(model), centres, strict=True):
        centre(model.graph, node, site if rotate else dataclasses.replace(site, do_rotary=False), k, v, positions)
    ir.save(model, tmp_path / "model.onnx", external_data="model.onnx.data")
    return session(tmp_path / "model.onnx")


@pytest.fixture(scope="module")
def centres():
    """Per layer, K and V centres far from 0 (several times the values' own spread)."""
    rng = np.random.default_rng(3)
    return [
        (
            rng.normal(0, 3, KV_HEADS * HEAD_DIM).astype(np.float32),
            rng.normal(0, 3, KV_HEADS * HEAD_DIM).astype(np.float32),
        )
        for _ in range(LAYERS)
    ]


def test_centring_leaves_the_float_model_unchanged(genai_float_dir, float_sess, centres, tmp_path):
    """Prefill, a second chunk after it, a decode step, and a batch of two with the second row padded: the
    centred model's logits are the float model's, and its cache holds RoPE'd K and V less their centres at
    every position, which holds only if the centring rotates by GQA's own positions."""
    sess = centred_float(genai_float_dir, centres, tmp_path)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, VOCAB, (2, 20))
    mask = np.ones((2, 20), np.int64)
    mask[1, 13:] = 0  # the second row is 13 tokens, right-padded
    chunk, step = rng.integers(0, VOCAB, (1, 7)), rng.integers(0, VOCAB, (1, 1))
    float_past, centred_past = empty_cache(float_sess, HEAD_DIM, 2), empty_cache(sess, HEAD_DIM, 2)
    cases = [("padded batch", ids, mask, float_past, centred_past)]
    _, f_past = forward(float_sess, ids[:1], empty_cache(float_sess, HEAD_DIM))
    _, c_past = forward(sess, ids[:1], empty_cache(sess, HEAD_DIM))
    cases.append(("chunk after a prompt", chunk, np.ones((1, 27), np.int64), f_past, c_past))
    cases.append(("decode step", step, np.ones((1, 21), np.int64), f_past, c_past))
    for what, x, m, fp, cp in cases:
        want, want_past = forward(float_sess, x, fp, m)
        got, got_past = forward(sess, x, cp, m)
        valid = m[:, -x.shape[1] :].astype(bool)
        scale = np.abs(want[valid]).max()
        assert np.abs(got[valid] - want[valid]).max() < 1e-4 * scale, what
        for layer, (k, v) in enumerate(centres):
            for side, c in (("key", k), ("value", v)):
                name = f"past_key_values.{layer}.{side}"
                expected = want_past[name] - c.reshape(1, KV_HEADS, 1, HEAD_DIM)
                rows = m.astype(bool)[:, None, :, None] & np.ones_like(expected, bool)
                assert np.abs(got_past[name] - expected)[rows].max() < 1e-4, (what, name)


def test_centring_k_needs_the_rotation(genai_float_dir, float_sess, centres, tmp_path, prompt):
    """Subtracting K's centre before RoPE without rotating it back changes the logits: the check above can fail."""
    sess = centred_float(genai_float_dir, centres, tmp_path, rotate=False)
    want, _ = forward(float_sess, prompt, empty_cache(float_sess, HEAD_DIM))
    got, _ = forward(sess, prompt, empty_cache(sess, HEAD_DIM))
    assert np.abs(got - want).max() > 1e-2 * np.abs(want).max()
