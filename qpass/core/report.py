"""The compile report: ``report.json``, a short human summary, and ``report.png`` (per-layer SQNR)."""

import json
from pathlib import Path

from qpass.core import longcontext
from qpass.core.fallback import MEASURES, per_linear
from qpass.core.saturation import flagged_names

LONG_CONTEXT_PLOT = "longcontext.png"  # beside the report, when the compile ran the long-context check


def summary(report: dict) -> str:
    """A few lines for a terminal."""
    lines = [
        f"qpass: {report['model']['name']}: {len(report['sites'])} attention sites, "
        f"{report['model']['num_heads']} heads / {report['model']['num_kv_heads']} kv heads, "
        f"head_dim {report['model']['head_dim']}"
    ]
    cfg = report["config"]
    cache = {
        "static": "int8 KV cache static (C8, per channel)",
        "dynamic": "int8 KV cache dynamic (per token and kv head)",
    }.get(cfg["kv_cache"])
    w8a8 = {"static": "W8A8", "dynamic": "W8A8 dynamic (activations per token)"}.get(cfg.get("w8a8"))
    w8a8 = "W8A8" if cfg.get("w8a8") is True else w8a8  # a report of an older qpass: W8A8 was a bool
    modes = [m for m, on in (("FAQuant", cfg["fa_quant"]), (cache, cache), (w8a8, w8a8)) if on]
    static = cfg["fa_quant"] or cfg["kv_cache"] == "static"  # the observer and symmetry apply to static scales only
    lines.append(
        f"  quantized: {' + '.join(modes)}"
        + (f"; observer {cfg['observer']}, {'symmetric' if cfg['symmetric'] else 'asymmetric'}" if static else "")
    )
    keys = report.get("key_smoothing")
    if keys:
        alphas = [a for a in keys.values() if not isinstance(a, str)]
        on = [a for a in alphas if a > 0]
        off = sorted({why for why in keys.values() if isinstance(why, str)})
        lines.append(
            f"  key smoothing: K's channels evened out at {len(on)} of {len(keys)} sites"
            + (f" (exponent {min(on):g} to {max(on):g}, folded into the q and k projections)" if on else "")
            + (f"; {len(alphas) - len(on)} kept as they were (none helped)" if len(alphas) > len(on) else "")
            + (f"; not applicable at {len(keys) - len(alphas)}: {'; '.join(off)}" if off else "")
        )
    w = report.get("w8a8")
    if w:
        lines.append(
            f"  W8A8: {w['quantized']} of {w['linears']} Linears int8 ("
            + ("activations per token, " if w.get("activations") == "dynamic" else f"act-method {w['act_method']}, ")
            + f"anti-method {w['anti_method'] or 'none'}, disable-level {w['disable_level']}); "
            f"{len(w['float_linears'])} float"
            + (f": {', '.join(sorted(w['float_linears']))}" if w["float_linears"] else "")
            + (
                f"; {len(w['dynamic_linears'])} with per-token activations"
                if w.get("dynamic_linears") and w.get("activations") != "dynamic"
                else ""
            )
        )
    lines.extend(per_linear_lines(w))
    lines.append(
        "  passes: "
        + (
            ", ".join(f"{k} {v}" for k, v in report["passes"].items())
            or "none (a layer-wise compile writes the recipe only)"
        )
    )
    ev = report.get("eval")
    if ev:
        lines.append(f"  eval: {ev['tokens']} tokens of {ev['file']}")
        reference = "" if ev["ppl_reference"] is None else f"reference {ev['ppl_reference']:.4f}, "
        run = "layer by layer" if ev.get("layerwise") else "program"
        lines.append(
            f"  perplexity: {reference}float {run} {ev['ppl_float']:.4f}, "
            f"quantized {ev['ppl_quant']:.4f} ({ev['ppl_increase_pct']:+.3f}%)"
        )
    sq = report["sqnr_db"]
    for kind in ("q", "k", "v"):
        vals = [s[kind] for s in sq.values() if kind in s]
        if vals:
            lines.append(f"  SQNR {kind}: min {min(vals):.1f} dB, mean {sum(vals) / len(vals):.1f} dB")
    lines.extend(saturation_lines(report.get("saturation")))
    zero = report.get("zero_range_channels")
    if zero:
        lines.append(
            "  flagged: channels that were 0 throughout calibration (scale 1): "
            + ", ".join(f"layer {layer} {kind} {n}" for layer, kinds in zero.items() for kind, n in kinds.items())
        )
    if report.get("long_context"):
        lines.extend(longcontext.summary_lines(report["long_context"]))
    lines.extend(f"  warning: {w}" for w in report.get("warnings", []))
    lines.append("  timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report["timings_s"].items()))
    return "\n".join(lines)


def long_context_summary(section: dict) -> str:
    """A few lines for a terminal on what ``qpass eval --context N`` measured (:func:`qpass.api.long_context`)."""
    lines = [f"qpass eval: long-context check, float {section['float']} beside the quantized model"]
    lines.extend(longcontext.summary_lines(section))
    lines.extend(f"  warning: {w}" for w in section["warnings"])
    lines.append(
        "  timings: "
        + ", ".join(f"{k} {v:.2f}s" for k, v in section["timings_s"].items())
        + "; the full record: --json"
    )
    return "\n".join(lines)


def eval_summary(result: dict) -> str:
    """A few lines for a terminal on what ``qpass eval`` measured (:func:`qpass.api.evaluate_saved`'s record)."""
    how = " (layer by layer)" if result.get("layerwise") else ""
    lines = [
        f"qpass eval: {result['tokens']} tokens of {result['file']} in {result['windows']} windows of "
        f"{result['window']}{how}"
    ]
    flt = result.get("float", {})
    if "ppl" in flt:
        lines.append(
            f"  perplexity: float {flt['ppl']:.4f}, quantized {result['ppl_quant']:.4f} "
            f"({result['ppl_increase_pct']:+.3f}%)"
        )
    else:
        lines.append(f"  perplexity: quantized {result['ppl_quant']:.4f} (float: {flt.get('skipped', 'not measured')})")
    sat = result.get("saturation")
    if sat and sat["measured"]:
        layer, kind, worst = max(
            ((layer, kind, v) for layer, kinds in sat["measured"].items() for kind, v in kinds.items()),
            key=lambda t: t[2],
        )
        calibrated = sat["calibration"].get(layer, {}).get(kind)
        lines.append(
            f"  saturation: worst layer {layer} {kind} {worst:.3%}"
            + ("" if calibrated is None else f" (calibration {calibrated:.3%})")
        )
    lines.extend(f"  warning: {w}" for w in result.get("warnings", []))
    lines.append(
        "  timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in result["timings_s"].items()) + "; the full record: --json"
    )
    return "\n".join(lines)


def read(directory: Path) -> dict:
    """The ``report.json`` qpass wrote into ``directory``, or ``{}`` where there is none (a directory made
    elsewhere)."""
    try:
        return json.loads((directory / "report.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def saturation_lines(sat: dict | None) -> list[str]:
    """Saturation per kind (max and mean over sites, measured and on the calibration text) and the flagged sites."""
    if not sat:
        return []
    on = {"eval": "eval", "held_out": f"{sat['windows']} held-out calibration windows"}.get(sat["measured_on"])
    lines = [f"  saturation (values at the int8 limits), {on + ' vs calibration' if on else 'calibration only'}:"]
    for kind in ("q", "k", "v"):
        parts = []
        for name, table in (("", sat["measured"]), ("calibration ", sat["calibration"])):
            vals = [s[kind] for s in table.values() if kind in s]
            if vals:
                parts.append(f"{name}max {max(vals):.3%} mean {sum(vals) / len(vals):.3%}")
        if parts:
            lines.append(f"    {kind}: " + "; ".join(parts))
    flagged = flagged_names(sat)
    if flagged:
        lines.append(f"  flagged: saturation ({sat['rule']}): {', '.join(flagged)}")
    return lines


def w8a8_section(recipe) -> dict:
    """``report["w8a8"]``: how many Linears are int8, which stayed float and why, the calibration figures, and per
    Linear its mode (static, dynamic or float), why, and its measured sensitivity (``per_linear``, most sensitive first
    by the measure ``ranked_by`` names: :func:`qpass.core.fallback.per_linear`)."""
    doc, stats = recipe.w8a8, recipe.stats.get("w8a8", {})
    dynamic = recipe.config.w8a8 == "dynamic"
    linears = len(doc["linears"]) if dynamic else len(stats.get("range_ratio", {}))
    ranked_by, rows = per_linear(recipe)
    return {
        "activations": recipe.config.w8a8,
        "act_method": doc["act_method"],
        "anti_method": doc["anti_method"],
        "alpha": doc["alpha"],
        "disable_level": doc["disable_level"],
        "linears": linears,
        "quantized": linears - len(doc["float_linears"]),
        "float_linears": doc["float_linears"],
        "dynamic_linears": doc.get("dynamic_linears", {}),
        "smooth_groups": len(doc["smooth"]),
        "fallback_search": stats.get("search", []),
        "ranked_by": ranked_by,
        "per_linear": rows,
        "smoothing": stats.get("smooth", {}),
        "output_sqnr_db": stats.get("output_sqnr_db", {}),
        "act_method_used": stats.get("act_method_used", {}),
    }


MOST_SENSITIVE = 5  # the Linears the summary names; report.json has them all


def per_linear_lines(w8a8: dict | None) -> list[str]:
    """The Linears per mode and the most sensitive few (``report["w8a8"]["per_linear"]``; none in a report of an older
    qpass, which has no such table)."""
    rows = (w8a8 or {}).get("per_linear")
    if not rows:
        return []
    counts = {mode: sum(row["mode"] == mode for row in rows) for mode in ("static", "dynamic", "float")}
    line = "  W8A8 per Linear: " + ", ".join(f"{n} {mode}" for mode, n in counts.items() if n)
    ranked = w8a8.get("ranked_by")
    if ranked is None:
        why = (
            "no sensitivity measured (dynamic W8A8)"
            if w8a8.get("activations") == "dynamic"
            else "not ranked (the recipe, of an older qpass, records no ranking)"
        )
        return [f"{line}; {why}; each Linear's reason: report.json w8a8.per_linear"]
    lines = [f"{line}; most sensitive by {MEASURES[ranked][2]} (all {len(rows)}: report.json w8a8.per_linear):"]
    lines.extend(f"    {row['name']}: {row['reason']}" for row in rows[:MOST_SENSITIVE])
    return lines


def write(report: dict, directory: Path) -> None:
    """``report.json``, ``report.txt`` and ``report.png`` into ``directory``."""
    (directory / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    (directory / "report.txt").write_text(summary(report) + "\n", encoding="utf-8")
    plot_sqnr(report, directory / "report.png")


def plot_sqnr(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sq = report["sqnr_db"]
    layers = sorted(int(k) for k in sq)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for kind, marker in (("q", "o"), ("k", "s"), ("v", "^")):
        ys = [sq[str(layer)].get(kind) for layer in layers]
        if any(y is not None for y in ys):
            ax.plot(layers, ys, marker=marker, label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(f"{report['model']['name']}: int8 SQNR per layer")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    else:  # W8A8 alone: no q/k/v is quantized; the dynamic cache: no q/k/v has a calibrated scale
        dynamic = report["config"].get("kv_cache") == "dynamic"
        ax.text(
            0.5,
            0.5,
            "the dynamic KV cache's scales are computed as it is written: none calibrated"
            if dynamic
            else "no attention quantization (--fa-quant / --kv-int8) in this compile",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
