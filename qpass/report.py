"""The compile report: ``report.json``, a short human summary, and ``report.png`` (per-layer SQNR)."""

import json
from pathlib import Path


def summary(report: dict) -> str:
    """A few lines for a terminal."""
    lines = [f"qpass: {report['model']['name']}: {len(report['sites'])} attention sites, "
             f"{report['model']['num_heads']} heads / {report['model']['num_kv_heads']} kv heads, head_dim {report['model']['head_dim']}"]
    cfg = report["config"]
    modes = [m for m, on in (("FAQuant", cfg["fa_quant"]), ("C8 int8 KV cache", cfg["kv_cache"] == "int8")) if on]
    lines.append(f"  quantized: {' + '.join(modes)}; observer {cfg['observer']}, {'symmetric' if cfg['symmetric'] else 'asymmetric'}")
    lines.append("  passes: " + ", ".join(f"{k} {v}" for k, v in report["passes"].items()))
    ev = report.get("eval")
    if ev:
        lines.append(f"  eval: {ev['tokens']} tokens of {ev['file']}")
        lines.append(f"  perplexity: reference {ev['ppl_reference']:.4f}, float program {ev['ppl_float']:.4f}, "
                     f"quantized {ev['ppl_quant']:.4f} ({ev['ppl_increase_pct']:+.3f}%)")
    sq = report["sqnr_db"]
    for kind in ("q", "k", "v"):
        vals = [s[kind] for s in sq.values() if kind in s]
        if vals:
            lines.append(f"  SQNR {kind}: min {min(vals):.1f} dB, mean {sum(vals) / len(vals):.1f} dB")
    lines.append("  timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report["timings_s"].items()))
    return "\n".join(lines)


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
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
