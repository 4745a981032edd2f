"""W8A8: what the program computes with and without smoothing (numbers), policy, fallback, recipe, CLI (the Linears
InsertW8A8Pass rewrites: tests/passes/fx/test_insert_w8a8.py)."""

import json
import math

import pytest
import torch

from qpass.cli import main
from qpass.core.calibrate import calibrate
from qpass.core.config import QuantConfig
from qpass.core.errors import QpassError
from qpass.core.naming import fused_siblings
from qpass.core.ranges import act_qparams
from qpass.core.recipe import Recipe, linear_key
from qpass.frontends.torch_export.pipeline import quantize_program
from qpass.models.tiny import tiny_model
from qpass.passes.fx.patterns import W8A8_DYNAMIC_LINEAR, W8A8_LINEAR
from tests.helpers.frontend_cases import calibrated, frontend

WINDOW = 32
LINEAR = torch.ops.aten.linear.default


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", num_layers=2)
    fe = frontend(model, WINDOW)
    ids = torch.randint(0, 256, (8, WINDOW), generator=torch.Generator().manual_seed(1))
    return fe, fe.program, fe.attention_sites(), ids


def _costly(module) -> int:
    """The Linears a fake search measure charges +1% each beyond 9, of the 14 of the tiny model: the static ones, and
    the per-token ones while fewer than 3 Linears are float (beside 3 they are free): per-token activations do not
    save the 10% share (2 float), so the search keeps 3 float, and then they bring the bound within half the limit."""
    static = len(module.graph.find_nodes(op="call_function", target=W8A8_LINEAR))
    dynamic = len(module.graph.find_nodes(op="call_function", target=W8A8_DYNAMIC_LINEAR))
    return static + (dynamic if static + dynamic > 11 else 0)


def _recipe(tiny, **config):
    fe, _, _, ids = tiny
    return calibrate(fe, ids, QuantConfig(w8a8=True, **config), batch_size=4)


def test_w8a8_program_stays_close_to_float_and_smoothing_does_not_hurt(tiny):
    _, program, sites, ids = tiny
    reference = program.module()(ids[:2])

    def rel_error(**config):
        quantized, _ = quantize_program(program, sites, _recipe(tiny, **config))
        return float((quantized.module()(ids[:2]) - reference).detach().norm() / reference.detach().norm())

    plain = rel_error(act_method=1)
    assert plain < 0.05
    assert rel_error(act_method=3, anti_method="m3") <= plain * 1.05


def test_fa_c8_and_w8a8_together(tiny):
    _, program, sites, ids = tiny
    recipe = _recipe(tiny, fa_quant=True, kv_cache="static", anti_method="m1")
    quantized, counts = quantize_program(program, sites, recipe)
    assert counts == {"InsertFAQuantQDQPass": 6, "InsertKVCacheQDQPass": 4, "InsertW8A8Pass": 14}
    assert {f"smooth.{i}.scale" for i in range(8)} <= set(recipe.tensors)
    assert recipe.tensors["w8a8.model.layers.0.self_attn.q_proj.input_scale"].shape == (1,)


def test_act_methods():
    from qpass.core.int8 import fake_quant

    x = torch.distributions.StudentT(1.5).sample((4096, 8))  # heavy tails: max|x| / std far above 50
    lo, hi = float(x.min()), float(x.max())
    (minmax, o1, used1), (hist, o2, used2), (auto, _, used3) = (act_qparams(lo, hi, x, 400.0, m) for m in (1, 2, 3))
    assert (used1, used2, used3) == ("min-max", "histogram", "min-max")
    assert float(minmax) == pytest.approx((hi - lo) / 255, rel=1e-5)
    error = lambda s, o: float((fake_quant(x, s, o) - x).pow(2).sum())  # noqa: E731
    assert float(hist) <= float(minmax) and error(hist, o2) <= error(minmax, o1)  # never worse on the sample
    assert float(auto) == float(minmax)
    # a range far wider than the bulk of the sample (rare outliers): the least-L2 clip cuts it
    wide, _, _ = act_qparams(-100.0, 100.0, torch.randn(4096, 8), 10.0, 2)
    assert float(wide) < 200.0 / 255 / 5
    _, _, used = act_qparams(-3.0, 3.0, torch.randn(512, 4), 3.0, 3)
    assert used == "histogram"


def test_histogram_clip_sees_every_channel():
    """One channel (5, not a multiple of any stride over the flattened values) sits at 10 while the
    rest are near 0: the least-L2 clip must keep it, so it must see it."""
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    x[:, 5] = 10.0
    scale, offset, used = act_qparams(float(x.min()), float(x.max()), x, 5.0, 2)
    assert used == "histogram"
    assert float((127 - offset) * scale) >= 9.9  # the top of the int8 range reaches the channel


def test_disable_level_n_keeps_the_widest_ranges_float(tiny):
    _, program, sites, _ = tiny
    recipe = _recipe(tiny, disable_level="L2")
    floats = recipe.w8a8["float_linears"]
    ratios = recipe.stats["w8a8"]["range_ratio"]
    assert len(floats) == 2 and min(ratios[n] for n in floats) >= max(r for n, r in ratios.items() if n not in floats)
    assert all(f"w8a8.{n}.input_scale" not in recipe.tensors for n in floats)
    quantized, counts = quantize_program(program, sites, recipe)
    assert counts == {"InsertW8A8Pass": 12}
    assert len(quantized.graph.find_nodes(op="call_function", target=LINEAR)) == 3
    with pytest.raises(QpassError, match="only 14 quantizable Linears"):
        _recipe(tiny, disable_level="L15")


def test_many_float_linears_without_smoothing_get_a_hint(tiny):
    from qpass.core.fallback import smoothing_hint

    hint = smoothing_hint(_recipe(tiny, disable_level="L2"))  # 2 of 14 float: more than 10%
    assert hint == (
        "W8A8: 2 of 14 Linears stay float, without smoothing; smoothing usually lets far fewer stay float: "
        "add --anti-method m3 --act-method 3"
    )
    assert smoothing_hint(_recipe(tiny, disable_level="L1")) is None  # 1 of 14: within 10%
    assert smoothing_hint(_recipe(tiny, disable_level="L2", anti_method="m1")) is None  # smoothed already


def test_auto_fallback_searches_the_fewest_float_linears(tiny, monkeypatch):
    import qpass.core.fallback as fallback

    monkeypatch.setattr(fallback, "_light_tailed", lambda *args: {})  # the search's own steps (the rule: below)
    loose = _recipe(tiny, disable_level="auto", max_ppl_increase=50.0)  # real perplexities: W8A8 is within 50%
    assert loose.w8a8["float_linears"] == {}
    assert loose.stats["w8a8"]["search"][1]["float_linears"] == 0

    import qpass.frontends.torch_export.frontend as torch_frontend

    def fake_window_nll(module, windows, batch_size, desc, score, noise=0.0):
        """The float run's NLL (perplexity 100); a trial's divergence: +1% per quantized Linear beyond the 9 least
        sensitive (:func:`_costly`)."""
        if desc == "fallback float":
            return torch.full((windows.shape[0],), math.log(100.0), dtype=torch.float64)
        assert score is not None  # the trials are measured by the divergence from the float run
        quantized = _costly(module)
        kl = torch.full((windows.shape[0],), math.log(1 + max(0, quantized - 9) / 100), dtype=torch.float64)
        return kl + noise * (quantized > 0) * torch.tensor([1.0, -1.0]).repeat(windows.shape[0] // 2)

    monkeypatch.setattr(torch_frontend, "window_nll", fake_window_nll)
    strict = _recipe(tiny, disable_level="auto", max_ppl_increase=2.5)
    floats = strict.w8a8["float_linears"]
    assert len(floats) == 3  # 14 - 3 = 11 quantized: +2%
    search = strict.stats["w8a8"]["search"]
    assert search[0]["held_out_windows"] == 2 and search[0]["measure"] == "kl"
    assert search[0]["ppl_float"] == pytest.approx(100.0)
    floats_steps = [step for step in search[1:] if step["dynamic_linears"] == 0]
    assert len(floats_steps) <= 7  # both rankings at 10%, then a binary search, not a sweep of 15 counts
    assert any(s["float_linears"] == 2 and s["dynamic_linears"] for s in search[1:])  # per token at the share first
    ranking = search[-1]["ranking"]
    # 3 float leave +2% (over half the limit): the next 10% (2 Linears, with their fused siblings) go per-token and
    # the bound falls within half the limit; their qparams leave the recipe and the program computes them per token
    dynamic = strict.w8a8["dynamic_linears"]
    order = sorted(strict.stats["w8a8"]["output_sqnr_db"], key=lambda n: -strict.stats["w8a8"]["loss_sensitivity"][n])
    if ranking == "sqnr":
        order = sorted(strict.stats["w8a8"]["output_sqnr_db"], key=strict.stats["w8a8"]["output_sqnr_db"].get)
    seeds = order[3:5]
    assert set(seeds) <= set(dynamic) and not set(dynamic) & set(floats)
    assert set(dynamic) == {m for n in seeds for m in fused_siblings(n)} - set(floats)
    assert search[-1]["dynamic_linears"] == len(dynamic) and search[-1]["upper_95_pct"] <= 1.25
    assert "per-token Linears after 3 float" in dynamic[seeds[0]]
    assert not any(linear_key(n, "scale") in strict.tensors for n in dynamic)
    assert set(strict.w8a8_linears()) == set(strict.stats["w8a8"]["output_sqnr_db"]) - set(floats)
    assert {strict.activations(n) for n in dynamic} == {"dynamic"}
    assert not _recipe(tiny, disable_level="auto", max_ppl_increase=2.5, static_only=True).w8a8.get("dynamic_linears")
    assert ranking in ("loss", "sqnr")
    key = {
        "loss": lambda n: -strict.stats["w8a8"]["loss_sensitivity"][n],
        "sqnr": lambda n: strict.stats["w8a8"]["output_sqnr_db"][n],
    }[ranking]
    assert max(key(n) for n in floats) <= min(key(n) for n in strict.stats["w8a8"]["output_sqnr_db"] if n not in floats)
    assert all(
        reason.startswith(f"auto: {ranking} sensitivity rank") and "within 2.5%" in reason for reason in floats.values()
    )
    assert all(v >= 0 for v in strict.stats["w8a8"]["loss_sensitivity"].values())

    # Held-out windows that disagree (+-1% NLL): the 95% upper bound, not the mean, is held to the limit.
    monkeypatch.setattr(torch_frontend, "window_nll", lambda *args: fake_window_nll(*args, noise=0.01))
    noisy = _recipe(tiny, disable_level="auto", max_ppl_increase=2.5)
    assert len(noisy.w8a8["float_linears"]) == 5  # 10 quantized: +1.0% estimated, bound +2.7%; 9: +0%, bound +1.7%
    last = [step for step in noisy.stats["w8a8"]["search"][1:] if step["dynamic_linears"] == 0][-1]
    assert last["upper_95_pct"] > last["ppl_increase_pct"]


def test_auto_gives_linears_with_a_light_tailed_input_per_token_activations(tiny, tmp_path):
    """A Linear whose input's max|x|/std is within sqrt(2 ln N), the reach of N Gaussian values, has no outlier to
    set its static range: the bulk sets it, and text of another kind moves the bulk. `auto` gives such Linears
    per-token activations from the first trial on; the others stay static; fused siblings share an input and go
    together; --static-only keeps them all static; the report says why."""
    from qpass.core.report import w8a8_section

    recipe = _recipe(tiny, disable_level="auto", max_ppl_increase=50.0)  # within the limit all-int8: no search step
    stats, dynamic = recipe.stats["w8a8"], recipe.dynamic_linears
    light = {n for n, ratio in stats["range_ratio"].items() if ratio <= stats["gaussian_reach"][n]}
    assert set(dynamic) == light and 0 < len(light) < len(stats["range_ratio"])  # 10 of 14 in this random model
    channels = {n: 128 if n.endswith("down_proj") else 64 for n in stats["range_ratio"]}  # 6 windows calibrate
    assert stats["gaussian_reach"] == {
        n: round(math.sqrt(2 * math.log(6 * WINDOW * c)), 3) for n, c in channels.items()
    }
    assert all(set(fused_siblings(n)) <= light for n in light)
    assert all(why.startswith("auto: light-tailed input (max|x|/std ") for why in dynamic.values())
    assert recipe.float_linears == {} and recipe.stats["w8a8"]["search"][1]["dynamic_linears"] == len(light)
    assert {recipe.activations(n) for n in light} == {"dynamic"}
    assert not any(linear_key(n, "scale") in recipe.tensors for n in light)
    rows = {r["name"]: r for r in w8a8_section(recipe)["per_linear"]}
    assert all(rows[n]["mode"] == "dynamic" and rows[n]["reason"].startswith("dynamic: light-tailed") for n in light)
    assert {n for n, r in rows.items() if r["mode"] == "static"} == set(stats["range_ratio"]) - light
    recipe.save(tmp_path / "recipe")
    assert Recipe.load(tmp_path / "recipe").dynamic_linears == dynamic
    static = _recipe(tiny, disable_level="auto", max_ppl_increase=50.0, static_only=True)
    assert not static.dynamic_linears and static.stats["w8a8"]["search"][1]["dynamic_linears"] == 0


def test_auto_searches_the_ranking_with_the_lower_estimate_not_the_lower_bound(monkeypatch):
    """At 10% float, ranking `loss` estimates +0.2% on two held-out windows that disagree (bound +0.5%) and `sqnr`
    +0.4% on two that agree (bound +0.4%): the rankings are compared on the same windows, so the estimates decide."""
    from types import SimpleNamespace

    import qpass.core.fallback as fallback

    names = [f"l{i}" for i in range(20)]
    diffs = {
        frozenset(): [0.03, 0.03],
        frozenset(names[:1]): [0.02, 0.02],
        frozenset(names[:2]): [0.0, 0.004],
        frozenset(names[-2:]): [0.0039, 0.0041],
    }

    class Trial(SimpleNamespace):
        def replace(self, w8a8):
            return Trial(config=self.config, stats=self.stats, w8a8=w8a8)

    stats = {
        "loss_sensitivity": {n: 20.0 - i for i, n in enumerate(names)},  # l0 the most sensitive
        "output_sqnr_db": {n: 40.0 - i for i, n in enumerate(names)},
    }  # l19 the most sensitive
    recipe = Trial(
        config=QuantConfig(w8a8=True, disable_level="auto", max_ppl_increase=1.0),
        stats={"w8a8": stats},
        w8a8={"float_linears": {}},
    )

    def divergence(trial, windows, batch, desc):
        return torch.tensor(diffs[frozenset(trial.w8a8["float_linears"])], dtype=torch.float64)

    floats, _, search = fallback.choose_fallback(
        recipe, [SimpleNamespace(module=n) for n in names], torch.zeros(2, 8, dtype=torch.long), divergence, 4
    )
    at_cap = {step["ranking"]: step for step in search[1:] if step["float_linears"] == 2}
    assert (
        at_cap["loss"]["upper_95_pct"]
        > at_cap["sqnr"]["upper_95_pct"]
        > at_cap["sqnr"]["ppl_increase_pct"]
        > at_cap["loss"]["ppl_increase_pct"]
    )
    assert sorted(floats) == ["l0", "l1"] and search[0]["ranking"] == "loss"  # the ranking searched


def test_auto_spends_the_share_first_and_goes_beyond_it_only_on_its_estimate():
    """Below the 10% share a count must keep its 95% bound within half the limit (held-out windows are of the
    calibration's kind; other text costs more); otherwise the share is kept, while its estimate is within the limit,
    even where its bound is not: Linears beyond it cost speed, and a noisy measure must not buy them (a 14-window file
    once kept 69 of 210 float this way). Only an estimate over the limit at the share sends the search past it, where
    the 95% bound is held to the limit itself."""
    from types import SimpleNamespace

    import qpass.core.fallback as fallback

    names = [f"l{i}" for i in range(20)]

    class Trial(SimpleNamespace):
        def replace(self, w8a8):
            return Trial(config=self.config, stats=self.stats, w8a8=w8a8)

    def choose(diffs):
        stats = {
            "loss_sensitivity": {n: 20.0 - i for i, n in enumerate(names)},
            "output_sqnr_db": {n: 40.0 - i for i, n in enumerate(names)},
        }
        recipe = Trial(  # the float Linears' rules alone: no per-token step
            config=QuantConfig(w8a8=True, disable_level="auto", max_ppl_increase=1.0, static_only=True),
            stats={"w8a8": stats},
            w8a8={"float_linears": {}},
        )

        def divergence(trial, windows, batch, desc):
            return torch.tensor(diffs.get(len(trial.w8a8["float_linears"]), [0.0, 0.0]), dtype=torch.float64)

        return fallback.choose_fallback(
            recipe, [SimpleNamespace(module=n) for n in names], torch.zeros(2, 8, dtype=torch.long), divergence, 4
        )

    diffs = {0: [0.03, 0.03], 1: [0.001, 0.003], 2: [0.0, 0.002]}
    floats, _, search = choose(diffs)  # the share's bound +0.27% and 1 float's +0.37%, both within half of 1%: one
    assert sorted(floats) == ["l0"] and "95% +0.37% (within 1.0%; a count below the float share of 2" in floats["l0"]
    assert [step["float_linears"] for step in search[1:]] == [0, 2, 2, 1]  # none, both rankings at the share, 1

    floats, _, _ = choose({**diffs, 1: [0.001, 0.005]})  # 1 float: bound +0.63%, within 1% but not within 0.5%
    assert sorted(floats) == ["l0", "l1"]

    floats, _, search = choose({**diffs, 1: [0.0, 0.03], 2: [0.0, 0.018]})  # the share: +0.90%, bound +2.4%
    assert sorted(floats) == ["l0", "l1"] and "NOT within 1.0%" in floats["l0"]
    assert max(step["float_linears"] for step in search[1:]) == 2  # nothing beyond the share was tried

    floats, _, search = choose({**diffs, 2: [0.0, 0.02], 3: [0.0, 0.006]})  # the share's estimate +1.005%: beyond it
    assert sorted(floats) == ["l0", "l1", "l2"] and 0.5 < search[-1]["upper_95_pct"] < 1.0


def test_auto_tries_per_token_activations_at_the_share_before_going_beyond_it():
    """Where the share's estimate is over the limit, the Linears ranked next get per-token activations at the share
    first (the next 10%, then twice as many); only where that leaves the estimate over the limit too do more Linears
    go float (a 7-window file of legal prose once kept 51 of 210 float this way)."""
    from types import SimpleNamespace

    import qpass.core.fallback as fallback

    names = [f"l{i}" for i in range(20)]

    class Trial(SimpleNamespace):
        def replace(self, w8a8):
            return Trial(config=self.config, stats=self.stats, w8a8=w8a8)

    def choose(helped: bool):
        stats = {
            "loss_sensitivity": {n: 20.0 - i for i, n in enumerate(names)},
            "output_sqnr_db": {n: 20.0 + i for i, n in enumerate(names)},  # the same order
        }
        recipe = Trial(
            config=QuantConfig(w8a8=True, disable_level="auto", max_ppl_increase=1.0),
            stats={"w8a8": stats},
            w8a8={"float_linears": {}},
        )

        def divergence(trial, windows, batch, desc):  # 3% below 3 float; per token, 4 Linears bring it to 0.3%
            floats, dynamic = len(trial.w8a8["float_linears"]), len(trial.w8a8["dynamic_linears"])
            kl = 0.003 if floats >= 3 or (helped and dynamic >= 4) else 0.03
            return torch.tensor([kl, kl], dtype=torch.float64)

        return fallback.choose_fallback(
            recipe, [SimpleNamespace(module=n) for n in names], torch.zeros(2, 8, dtype=torch.long), divergence, 4
        )

    floats, dynamic, search = choose(helped=True)
    assert sorted(floats) == ["l0", "l1"] and sorted(dynamic) == ["l2", "l3", "l4", "l5"]
    assert max(step["float_linears"] for step in search[1:]) == 2  # no float Linear beyond the share was tried
    assert [step["dynamic_linears"] for step in search[1:] if step["dynamic_linears"]] == [2, 4]
    assert "from +3.05% to +0.30%" in dynamic["l2"]
    assert floats["l0"].endswith("+3.05% (NOT within 1.0%); with the next 4 per-token, +0.30%: within 1.0%")

    floats, dynamic, search = choose(helped=False)  # per-token activations do not help: 3 float
    assert sorted(floats) == ["l0", "l1", "l2"] and not dynamic
    assert [step["dynamic_linears"] for step in search[1:] if step["dynamic_linears"]] == [2, 4, 8, 16, 18]


def test_report_says_per_linear_static_or_float_and_why_for_ln_and_l0(tiny):
    from qpass.core.report import per_linear_lines, w8a8_section

    w = w8a8_section(_recipe(tiny, disable_level="L2"))
    rows = w["per_linear"]
    assert w["ranked_by"] == "range" and len(rows) == 14
    assert [r["rank"] for r in rows] == list(range(1, 15))
    assert [r["mode"] for r in rows] == ["float"] * 2 + ["static"] * 12
    assert {r["name"] for r in rows if r["mode"] == "float"} == set(w["float_linears"])
    assert [r["range_ratio"] for r in rows] == sorted((r["range_ratio"] for r in rows), reverse=True)
    top, third = rows[0], rows[2]
    assert top["reason"] == f"fell back: level L2: activation range max|x|/std = {top['range_ratio']:.1f}, rank 1 of 14"
    assert third["reason"].endswith("rank 3 of 14, not among the 2 widest (L2)")
    assert all(isinstance(r["output_sqnr_db"], float) and "loss_sensitivity" not in r for r in rows)  # no search ran
    lines = per_linear_lines(w)
    assert lines[0].startswith("  W8A8 per Linear: 12 static, 2 float; most sensitive by activation range")
    assert len(lines) == 6 and lines[1] == f"    {top['name']}: {top['reason']}"  # the few; report.json has them all

    w = w8a8_section(_recipe(tiny))  # L0: nothing kept float, no search; the output SQNR was measured all the same
    assert w["ranked_by"] == "sqnr" and {r["mode"] for r in w["per_linear"]} == {"static"}
    assert w["per_linear"][0]["reason"].endswith("rank 1 of 14; --disable-level L0, no search ran")


def test_report_says_dynamic_and_that_no_sensitivity_was_measured(tiny):
    from qpass.core.report import per_linear_lines, w8a8_section

    fe, _, _, ids = tiny
    w = w8a8_section(calibrate(fe, ids, QuantConfig(w8a8="dynamic"), batch_size=4))
    assert w["ranked_by"] is None and len(w["per_linear"]) == 14
    assert all(
        r["mode"] == "dynamic"
        and r["rank"] is None
        and "no sensitivity measured" in r["reason"]
        and not {"loss_sensitivity", "output_sqnr_db", "range_ratio"} & set(r)
        for r in w["per_linear"]
    )
    assert per_linear_lines(w) == [
        "  W8A8 per Linear: 14 dynamic; no sensitivity measured (dynamic W8A8); each Linear's reason: "
        "report.json w8a8.per_linear"
    ]


def test_report_says_which_linears_the_search_kept_float_by_their_sensitivity(tiny, monkeypatch, tmp_path):
    import qpass.core.fallback as fallback
    import qpass.frontends.torch_export.frontend as torch_frontend
    from qpass.core.report import per_linear_lines, w8a8_section

    monkeypatch.setattr(fallback, "_light_tailed", lambda *args: {})  # the search's own choice (the rule: above)

    def fake_window_nll(module, windows, batch_size, desc, score):  # divergence +1% per quantized Linear beyond 9
        quantized = 0 if desc == "fallback float" else _costly(module)
        return torch.full((windows.shape[0],), math.log(1 + max(0, quantized - 9) / 100), dtype=torch.float64)

    monkeypatch.setattr(torch_frontend, "window_nll", fake_window_nll)
    recipe = _recipe(tiny, disable_level="auto", max_ppl_increase=2.5)
    w = w8a8_section(recipe)
    ranking = recipe.stats["w8a8"]["search"][0]["ranking"]
    assert w["ranked_by"] == ranking == recipe.stats["w8a8"]["search"][-1]["ranking"]
    rows = w["per_linear"]
    dynamic = recipe.dynamic_linears  # 3 float leave +2%, over half the limit: the next ones go per-token
    assert [r["mode"] for r in rows[:5]] == ["float"] * 3 + ["dynamic"] * 2 and len(dynamic) >= 2
    assert [r["mode"] for r in rows].count("static") == 11 - len(dynamic)
    assert {r["name"] for r in rows[:3]} == set(recipe.float_linears)
    assert {r["name"] for r in rows if r["mode"] == "dynamic"} == set(dynamic)
    figure = {"loss": "loss sensitivity", "sqnr": "output SQNR"}[ranking]
    assert rows[0]["reason"].startswith(f"kept float by the search: {figure} ") and "rank 1 of 14" in rows[0]["reason"]
    assert (
        rows[3]["reason"].startswith("dynamic: per-token activations, chosen by the search")
        and "rank 4 of 14" in (rows[3]["reason"])
    )
    static = next(r for r in rows if r["mode"] == "static")
    assert static["reason"].endswith(
        f"the search kept the 3 most sensitive float and gave the next {len(dynamic)} per-token activations"
    )
    assert f"{len(dynamic)} dynamic" in per_linear_lines(w)[0]
    assert all(r["loss_sensitivity"] == recipe.stats["w8a8"]["loss_sensitivity"][r["name"]] for r in rows)
    recipe.save(tmp_path / "recipe")
    assert w8a8_section(Recipe.load(tmp_path / "recipe"))["per_linear"] == rows  # the ranking travels in the recipe

    # A recipe of an older qpass: its search did not record the ranking; the report says so instead of guessing.
    search = recipe.stats["w8a8"]["search"]
    old = recipe.replace(
        stats={**recipe.stats, "w8a8": {**recipe.stats["w8a8"], "search": [{"held_out_windows": 2}, *search[1:]]}}
    )
    w = w8a8_section(old)
    assert w["ranked_by"] is None and all(r["rank"] is None for r in w["per_linear"])
    floats = [r for r in w["per_linear"] if r["mode"] == "float"]
    assert [r["reason"] for r in floats] == [f"float: {recipe.float_linears[r['name']]}" for r in floats]
    assert "not ranked" in per_linear_lines(w)[0]


def test_increase_bound_is_the_estimate_for_one_window_and_above_it_for_several():
    from qpass.core.fallback import increase_bound

    assert increase_bound(torch.tensor([0.02], dtype=torch.float64)) == pytest.approx((math.exp(0.02) * 100 - 100,) * 2)
    inc, upper = increase_bound(torch.tensor([0.01, 0.03], dtype=torch.float64))
    assert inc == pytest.approx((math.exp(0.02) - 1) * 100) and upper > inc
    assert increase_bound(torch.tensor([0.02, 0.02], dtype=torch.float64))[1] == pytest.approx(inc)


def test_config_validation():
    with pytest.raises(ValueError, match="act_method=4"):
        QuantConfig(w8a8=True, act_method=4)
    with pytest.raises(ValueError, match="anti_method='m6'"):
        QuantConfig(w8a8=True, anti_method="m6")
    with pytest.raises(ValueError, match="disable_level='L-1'"):
        QuantConfig(w8a8=True, disable_level="L-1")
    with pytest.raises(ValueError, match="apply to W8A8 only"):
        QuantConfig(fa_quant=True, anti_method="m1")
    with pytest.raises(ValueError, match="max_ppl_increase"):
        QuantConfig(w8a8=True, max_ppl_increase=0)
    with pytest.raises(ValueError, match="static_only=True applies to disable_level='auto'.*drop --static-only"):
        QuantConfig(w8a8=True, static_only=True)
    assert QuantConfig(w8a8=True).fa_quant is False  # W8A8 alone is something to quantize


def test_recipe_round_trip_is_byte_deterministic(tiny, tmp_path):
    recipe = _recipe(tiny, anti_method="m3", disable_level="L1")
    recipe.save(tmp_path / "a")
    loaded = Recipe.load(tmp_path / "a")
    assert loaded.w8a8 == recipe.w8a8 and loaded.config == recipe.config
    assert set(loaded.w8a8) == {"act_method", "anti_method", "alpha", "disable_level", "smooth", "float_linears"}
    loaded.save(tmp_path / "b")
    for name in ("recipe.json", "recipe.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    _, program, sites, ids = tiny
    a, _ = quantize_program(program, sites, recipe)
    b, _ = quantize_program(program, sites, loaded)
    assert torch.equal(a.module()(ids[:1]), b.module()(ids[:1]))


def test_decoder_with_w8a8_generates_like_its_reference():
    from qpass.frontends.torch_export.decoder import build_decoder, generate_lowered, generate_reference

    model = tiny_model("llama", num_layers=1, hidden_size=256)  # head_dim 64: the paged ops support it
    _, recipe = calibrated(model, torch.randint(0, 256, (4, WINDOW)), kv_cache="static", w8a8=True, anti_method="m1")
    reference, lowered = build_decoder(model, recipe, max_context=64)
    assert len(lowered.graph.find_nodes(op="call_function", target=W8A8_LINEAR)) == 7
    prompt = [1, 5, 9, 13]
    assert generate_lowered(lowered, prompt, 6) == generate_reference(reference, prompt, 6)


def test_cli_compile_w8a8_then_eval_reproduces(tiny_model_dir, text_files, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "compile",
            str(tiny_model_dir),
            "--w8a8",
            "--kv-int8",
            "--act-method",
            "3",
            "--anti-method",
            "m3",
            "--disable-level",
            "L1",
            "--calib",
            str(text_files["calib"]),
            "--eval",
            str(text_files["prose"]),
            "-o",
            str(out),
            "--window",
            "64",
            "--calib-samples",
            "4",
            "--eval-windows",
            "2",
            "--batch-size",
            "2",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    w = report["w8a8"]
    assert (w["linears"], w["quantized"], len(w["float_linears"])) == (14, 13, 1)
    assert next(iter(w["float_linears"].values())).startswith("L1: activation range")
    assert w["ranked_by"] == "range" and [r["mode"] for r in w["per_linear"]] == ["float"] + ["static"] * 13
    printed = capsys.readouterr().out
    assert "  W8A8 per Linear: 13 static, 1 float; most sensitive by activation range" in printed
    assert "W8A8 per Linear: 13 static, 1 float" in (out / "report.txt").read_text()
    from qpass.core.report import summary

    older = {**report, "w8a8": {k: v for k, v in w.items() if k not in ("per_linear", "ranked_by")}}
    assert "W8A8 per Linear" not in summary(older)  # a report.json of an older qpass still reads
    assert main(["eval", str(out), "--eval", str(text_files["prose"]), "--eval-windows", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl_quant"] == pytest.approx(report["eval"]["ppl_quant"], rel=1e-6)
    assert main(["compile", str(tiny_model_dir), "--w8a8", "--disable-level", "L2x", "-o", str(tmp_path / "bad")]) == 2
    assert "disable_level='L2x'" in capsys.readouterr().err


def test_int8_matmul_is_exactly_int_mm_on_either_path(monkeypatch):
    from qpass.runtime import w8a8

    gen = torch.Generator().manual_seed(0)
    xq = torch.randint(-128, 128, (33, 1536), generator=gen, dtype=torch.int8)
    wq = torch.randint(-127, 128, (40, 1536), generator=gen, dtype=torch.int8)
    xq[0], wq[0] = -128, -127  # the largest magnitude sums int8 can make
    expected = torch._int_mm(xq, wq.t())
    for level in ("AVX2", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda level=level: level)
        got = w8a8.int8_matmul(xq, wq)
        assert got.dtype == torch.int32 and torch.equal(got, expected)
