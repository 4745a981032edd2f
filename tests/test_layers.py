"""The layers: the contracts see every module, `import qpass` stays cheap, the core loads no frontend, and the exporters
name tensors from the sites."""

import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import torch

import qpass
from qpass.core.errors import QpassError
from qpass.exporters.mindie_write import export_mindie
from qpass.models.tiny import tiny_model
from tests.helpers.frontend_cases import calibrated


def test_the_contracts_import_graph_holds_every_module():
    """import-linter's graph (grimp's) holds every ``.py`` file under ``qpass/``: a package without ``__init__.py``
    would drop out of it, and out of every contract, silently."""
    root = Path(qpass.__file__).parent
    files = {
        ".".join(("qpass", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        for p in root.rglob("*.py")
    }
    assert files == set(grimp.build_graph("qpass").modules)


def _loaded_after(statement: str) -> list[str]:
    loaded = "sorted(m for m in sys.modules if m == 'torch' or m.startswith('qpass'))"
    code = f"import sys; {statement}; print(' '.join({loaded}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_import_qpass_is_lazy():
    assert _loaded_after("import qpass") == ["qpass"]
    loaded = _loaded_after("import qpass; qpass.QuantConfig")
    assert "torch" not in loaded and "qpass.core.config" in loaded


def test_the_core_loads_only_the_core():
    loaded = _loaded_after("import qpass.core.recipe, qpass.core.calibrate")
    assert [m for m in loaded if m.startswith("qpass") and not m.startswith("qpass.core")] == ["qpass"]


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma3"])
def test_mindie_names_come_from_the_sites(arch, tmp_path):
    model = tiny_model(arch, num_layers=2)
    ids = torch.randint(0, 256, (2, 16))
    _, recipe = calibrated(model, ids, fa_quant=True, kv_cache="static", w8a8=True)
    export_mindie(model.config.to_dict(), model.state_dict(), recipe, None, tmp_path, torch.float16)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "quant_model_weight_w8a8.safetensors"), framework="pt") as f:
        names = set(f.keys())
    for site in recipe.sites:
        assert f"{site.prefix}.fa_q.scale" in names and f"{site.projections[1]}.kv_cache_scale" in names
    assert "model.layers.1.self_attn.k_proj.kv_cache_offset" in names


def _phi3():
    from transformers import AutoModelForCausalLM, Phi3Config

    torch.manual_seed(0)
    config = Phi3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize(
    "arch, fused", [("gpt2", "transformer.h.0.attn.c_attn"), ("phi3", "model.layers.0.self_attn.qkv_proj")]
)
def test_an_architecture_the_format_cannot_name_is_refused(arch, fused, tmp_path):
    model = _phi3() if arch == "phi3" else tiny_model(arch, num_layers=1)  # q, k and v from one fused projection
    _, recipe = calibrated(model, torch.randint(0, 256, (2, 16)), kv_cache="static")
    assert recipe.sites[0].projections[1] == fused
    with pytest.raises(QpassError, match="separate k_proj and v_proj"):
        export_mindie(model.config.to_dict(), model.state_dict(), recipe, None, tmp_path, torch.float16)
    assert not any(tmp_path.iterdir())
