"""What to quantize and how: decided once, validated on construction, read by the passes.

Each field carries its command-line flag and help (``metadata``), so ``qpass compile`` derives its
options, choices and defaults from here (:func:`cli_options`) instead of restating them.
"""

import argparse
import math
import re
from dataclasses import asdict, dataclass, field, fields

OBSERVERS = ("minmax", "percentile", "mse", "extreme", "reach")
KV_CACHE = (None, "static", "dynamic")
OLD_KV_CACHE = {"int8": "static"}  # recipes written before the cache had one name on every surface
W8A8 = (None, "static", "dynamic")
OLD_W8A8 = {True: "static", False: None}  # recipes written before W8A8 had a dynamic form: a bool
ACT_METHODS = (1, 2, 3)
ANTI_METHODS = (None, "m1", "m2", "m3", "m4")
DISABLE_LEVEL = re.compile(r"L(0|[1-9][0-9]*)|auto")
MAX_COUNT = 2**31 - 1  # a window, batch or count beyond this is no setting any run can hold
EVAL_WINDOWS = 32  # evaluation windows, at most (qpass compile --eval, qpass eval)


class UnreadSetting(ValueError):
    """A setting other than its default where the policy reads nothing of it (``name``: the field)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def _opt(flag: str, help: str, **argparse_kwargs) -> dict:
    return {"flag": flag, "help": help, **argparse_kwargs}


def _kv_form(value: str) -> str:
    """``--kv-int8``'s value, ``static`` or ``dynamic``: ``QuantConfig.kv_cache`` as it is."""
    if value not in KV_CACHE[1:]:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not static or dynamic (a bare --kv-int8 is static; give MODEL before --kv-int8)"
        )
    return value


def _w8a8_form(value: str) -> str:
    """``--w8a8``'s value, ``static`` or ``dynamic``: ``QuantConfig.w8a8`` as it is."""
    if value not in W8A8[1:]:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not static or dynamic (a bare --w8a8 is static; give MODEL before --w8a8)"
        )
    return value


@dataclass(frozen=True)
class QuantConfig:
    """The quantization policy of one compile.

    fa_quant: FAQuant, Q, K and V after RoPE quantized per head and per dim (``[heads, head_dim]``);
        the KV cache is then int8 too.
    kv_cache: ``"static"`` for C8, K and V quantized per channel (``[kv_heads * head_dim]``, calibrated) where
        they are written to the cache; ``"dynamic"`` for a cache whose K and V of each token and KV head get
        their own asymmetric scale and offset (min and max over head_dim) when they are written, stored beside
        the int8 cache (vLLM's ``int8_per_token_head`` granularity; no range to calibrate, only the key smoothing
        folded into the q and k projections, :mod:`qpass.core.smoothing`; not with FAQuant); None
        keeps the cache in float.
    observer: how a calibration range is chosen: ``reach`` (default: per channel, the range its
        extremes are expected to reach over 700 windows of text, from how they vary across the
        calibration windows; holds on text unlike the calibration text); ``extreme`` (the same over 100x the
        calibration's windows, the default before); ``minmax``; ``percentile`` (clip
        at ``percentile`` of |x| per channel); ``mse`` (clip range searched on a histogram to minimise the
        L2 error on the calibration text).
    symmetric: symmetric int8 (offset 0, [-127, 127]) instead of asymmetric.
    w8a8: every decoder Linear with int8 weights (symmetric, per output channel) and int8 activations:
        ``"static"`` asymmetric per tensor, calibrated; ``"dynamic"`` symmetric per token, each token's scale
        ``max|x| / 127`` computed at run time (msModelSlim's W8A8_DYNAMIC; nothing to calibrate but smoothing);
        None for none. lm_head and the embeddings stay float. (``True`` / ``False``, older recipes' form, read as
        ``"static"`` / None.)
    act_method: static W8A8 activation range: 1 min-max; 2 histogram (least-L2 clip); 3 per Linear, histogram
        when ``max(|min|, |max|) / std <= 50``, else min-max.
    anti_method: anti-outlier smoothing before W8A8 calibration: ``m1`` SmoothQuant (``alpha``),
        ``m2`` SmoothQuant on shifted ranges (``alpha``), ``m3`` activation-aware scaling with a searched
        exponent, ``m4`` iterative SmoothQuant (a = 0.9); None for none.
    disable_level: Linears kept float: ``L0`` none; ``Ln`` the n with the widest activation range
        (``max|x| / std``); ``auto`` the fewest, most sensitive first, keeping the divergence from the float model
        on held-out calibration text, as a perplexity increase (its one-sided 95% upper bound over the windows),
        within ``max_ppl_increase`` percent, then, where the float share does not reach half of it, the next most
        sensitive Linears with per-token activations (:mod:`qpass.core.fallback`); Linears with a light-tailed input
        get per-token activations from the start.
    static_only: ``auto`` keeps every int8 Linear's activations static: no per-token Linears in a static recipe.
    max_context: the longest context the calibrated ranges of q and k after RoPE must hold: the channel pairs RoPE
        turns too slowly to show every angle within the calibration window get ranges widened to where the tokens
        calibration saw reach when turned as far as position ``max_context`` turns them
        (:func:`qpass.core.ranges.rotary_range`); None keeps the ranges as calibrated.
    """

    fa_quant: bool = field(
        default=False, metadata=_opt("--fa-quant", "FAQuant: Q, K, V int8 per head and dim (KV cache int8 too)")
    )
    kv_cache: str | None = field(
        default=None,
        metadata=_opt(
            "--kv-int8",
            "int8 KV cache: bare or `static`, C8 (K and V per channel where written to the cache, "
            "calibrated); `dynamic`, a scale and offset per token and KV head computed as the cache is written",
            nargs="?",
            const="static",
            type=_kv_form,
            metavar="static|dynamic",
        ),
    )
    observer: str = field(
        default="reach",
        metadata=_opt(
            "--observer",
            "range choice (default reach: the range per-channel extremes reach over 700 windows of "
            "text; extreme: the same over 100x the calibration text; mse: histogram clip search; minmax; "
            "percentile)",
            choices=OBSERVERS,
        ),
    )
    symmetric: bool = field(
        default=False, metadata=_opt("--symmetric", "symmetric int8 (offset 0) instead of asymmetric")
    )
    percentile: float = field(
        default=99.99, metadata=_opt("--percentile", "clip percentile for --observer percentile (default 99.99)")
    )
    w8a8: str | None = field(
        default=None,
        metadata=_opt(
            "--w8a8",
            "W8A8: every decoder Linear int8 x int8, weights per channel; bare or `static`, activations per tensor "
            "(calibrated); `dynamic`, activations per token (scale max|x|/127 computed at run time)",
            nargs="?",
            const="static",
            type=_w8a8_form,
            metavar="static|dynamic",
        ),
    )
    act_method: int = field(
        default=1,
        metadata=_opt(
            "--act-method",
            "W8A8 activation range: 1 min-max (default), 2 histogram, 3 auto per Linear "
            "(histogram when max|x|/std <= 50)",
            choices=ACT_METHODS,
        ),
    )
    anti_method: str | None = field(
        default=None,
        metadata=_opt(
            "--anti-method",
            "anti-outlier smoothing: m1 SmoothQuant, m2 SmoothQuant on shifted ranges, "
            "m3 activation-aware (searched), m4 iterative",
            choices=ANTI_METHODS[1:],
        ),
    )
    alpha: float = field(
        default=0.5, metadata=_opt("--alpha", "SmoothQuant migration strength for m1/m2 (default 0.5)")
    )
    disable_level: str = field(
        default="L0",
        metadata=_opt(
            "--disable-level",
            "Linears kept float: L0 none (default), Ln the n with the widest activation range (e.g. L5), auto",
        ),
    )
    max_ppl_increase: float = field(
        default=2.0,
        metadata=_opt(
            "--max-ppl-increase",
            "--disable-level auto: perplexity increase allowed, as the held-out calibration text's divergence from "
            "the float model (95%% upper bound), percent (default 2)",
        ),
    )

    max_context: int | None = field(
        default=None,
        metadata=_opt(
            "--max-context",
            "the longest context the calibrated q/k ranges must hold (RoPE models): ranges of RoPE's slow channel "
            "pairs widened to where the calibration's tokens reach when turned so far (default: as calibrated, good "
            "up to --window)",
            type=int,
            metavar="N",
        ),
    )
    static_only: bool = field(
        default=False,
        metadata=_opt(
            "--static-only",
            "--disable-level auto: keep every int8 Linear's activations static (per tensor), for a runtime without "
            "per-token W8A8 (W8A8_DYNAMIC); by default Linears with a light-tailed input, and the next most sensitive "
            "where the float ones do not suffice, are per-token",
        ),
    )

    def __post_init__(self):
        _check_types(self)
        if self.kv_cache in OLD_KV_CACHE:  # an older recipe.json: the same cache under its old name
            object.__setattr__(self, "kv_cache", OLD_KV_CACHE[self.kv_cache])
        if isinstance(self.w8a8, bool):  # an older recipe.json (or caller): W8A8 was a bool, static
            object.__setattr__(self, "w8a8", OLD_W8A8[self.w8a8])
        if self.w8a8 not in W8A8:
            raise ValueError(
                f"w8a8={self.w8a8!r} is not supported; use 'static' (activations per tensor, calibrated), "
                "'dynamic' (per token, at run time) or None"
            )
        if not self.fa_quant and self.kv_cache is None and not self.w8a8:
            raise ValueError(
                "nothing to quantize: set fa_quant=True, kv_cache='static' and/or w8a8='static' "
                "(--fa-quant / --kv-int8 / --w8a8)"
            )
        if self.act_method not in ACT_METHODS:
            raise ValueError(f"act_method={self.act_method!r} is not one of 1 (min-max), 2 (histogram), 3 (auto)")
        if self.anti_method not in ANTI_METHODS:
            raise ValueError(
                f"anti_method={self.anti_method!r} is not one of m1, m2, m3, m4 (or None for no smoothing)"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]")
        if not isinstance(self.disable_level, str) or not DISABLE_LEVEL.fullmatch(self.disable_level):
            raise ValueError(f"disable_level={self.disable_level!r} is not L0, Ln (e.g. L5) or auto")
        if not self.max_ppl_increase > 0.0:
            raise ValueError(f"max_ppl_increase={self.max_ppl_increase} must be a positive percentage")
        if not self.w8a8 and (self.anti_method is not None or self.disable_level != "L0"):
            raise ValueError(
                f"anti_method={self.anti_method!r} / disable_level={self.disable_level!r} apply to W8A8 only; "
                "set w8a8='static' (--w8a8) or drop them"
            )
        if self.w8a8 == "dynamic" and self.disable_level != "L0":
            raise ValueError(
                f"disable_level={self.disable_level!r} with w8a8='dynamic' (--w8a8 dynamic): the fallback ranks and "
                "searches Linears by their calibrated activation ranges, which dynamic W8A8 does not have; drop "
                "--disable-level, or use --w8a8 (static)"
            )
        if self.kv_cache not in KV_CACHE:
            raise ValueError(
                f"kv_cache={self.kv_cache!r} is not supported; use 'static' (per channel, calibrated), "
                "'dynamic' (per token and KV head) or None"
            )
        if self.fa_quant and self.kv_cache == "dynamic":
            raise ValueError(
                "fa_quant=True with kv_cache='dynamic' (--fa-quant --kv-int8 dynamic): FAQuant fixes the "
                "cache to static int8 with its calibrated K/V scales; use --fa-quant --kv-int8 (static), "
                "or drop --fa-quant"
            )
        if self.symmetric and not self.observed_kinds:
            raise ValueError(
                "symmetric=True (--symmetric) applies to the calibrated attention scales (--fa-quant, --kv-int8 "
                "static) and this policy has none (the dynamic cache computes its own, W8A8's activations are "
                "asymmetric per tensor); drop --symmetric"
            )
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer={self.observer!r} is not one of {', '.join(OBSERVERS)}")
        if self.max_context is not None and (
            not isinstance(self.max_context, int) or isinstance(self.max_context, bool) or self.max_context <= 0
        ):
            raise ValueError(f"max_context={self.max_context} must be a positive number of tokens")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile={self.percentile} must be in (50, 100]")
        self._check_applies()

    def _check_applies(self) -> None:
        """Refuse a setting other than its default where nothing reads it: it would be recorded in the recipe and
        the report as if it had been applied."""
        unused = (
            (
                "observer",
                not self.observed_kinds,
                "chooses the calibrated attention scales (--fa-quant, --kv-int8 static) and this policy has none",
            ),
            ("percentile", self.observer != "percentile", "applies to observer='percentile' (--observer percentile)"),
            (
                "act_method",
                self.w8a8 != "static",
                "applies to static W8A8 (--w8a8); --w8a8 dynamic computes each token's scale at run time"
                if self.w8a8
                else "applies to W8A8 (--w8a8)",
            ),
            ("alpha", self.anti_method not in ("m1", "m2"), "applies to anti_method m1 or m2 (--anti-method m1/m2)"),
            (
                "max_ppl_increase",
                self.disable_level != "auto",
                "applies to disable_level='auto' (--disable-level auto)",
            ),
            ("static_only", self.disable_level != "auto", "applies to disable_level='auto' (--disable-level auto)"),
            (
                "max_context",
                not {"q", "k"} & set(self.observed_kinds),
                "widens calibrated q/k ranges (--fa-quant, --kv-int8 static) and this policy has none",
            ),
        )
        for name, unread, why in unused:
            value = getattr(self, name)
            if unread and value != _DEFAULTS[name]:
                flag = name.replace("_", "-")
                raise UnreadSetting(name, f"{name}={value!r} {why}, so it would be ignored; drop --{flag}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> "QuantConfig":
        """The policy a ``recipe.json`` holds; the run settings that older recipes kept beside it are left out, and
        a setting nothing reads under its policy is read as its default (older recipes recorded one as given, or an
        older default: the observer of a W8A8-only recipe was mse, then extreme)."""
        doc = {k: v for k, v in doc.items() if k not in RUN_FIELDS}
        for _ in _DEFAULTS:
            try:
                return cls(**doc)
            except UnreadSetting as unread:
                doc[unread.name] = _DEFAULTS[unread.name]
        return cls(**doc)

    @property
    def observed_kinds(self) -> tuple[str, ...]:
        """The attention values calibration observes: q, k, v for FAQuant; k, v for C8 alone; none for the
        dynamic cache (its scales are computed as it is written)."""
        if self.fa_quant:
            return ("q", "k", "v")
        return ("k", "v") if self.kv_cache == "static" else ()


@dataclass(frozen=True)
class RunSettings:
    """How one compile or evaluation runs: not policy, so not in the recipe, and kept with ``--recipe``."""

    window: int = field(
        default=512, metadata=_opt("--window", "tokens per window for calibration and eval (default 512)")
    )
    batch_size: int = field(default=4, metadata=_opt("--batch-size", "windows per forward pass (default 4)"))
    calib_samples: int = field(default=64, metadata=_opt("--calib-samples", "calibration windows (default 64)"))
    eval_windows: int = field(
        default=EVAL_WINDOWS,
        metadata=_opt("--eval-windows", f"at most this many eval windows (default {EVAL_WINDOWS})"),
    )

    def __post_init__(self):
        _check_types(self)
        for f in fields(self):
            if not 1 <= getattr(self, f.name) <= MAX_COUNT:
                raise ValueError(
                    f"{f.metadata['flag']} {getattr(self, f.name)}: must be an integer, at least 1 and at most "
                    f"{MAX_COUNT}"
                )


RUN_FIELDS = frozenset(f.name for f in fields(RunSettings))
_DEFAULTS = {f.name: f.default for f in fields(QuantConfig)}


def _check_types(settings) -> None:
    """Refuse a field whose value is not of its default's type (a recipe.json read back may hold anything)."""
    for f in fields(settings):
        value, want = getattr(settings, f.name), {bool: (bool,), int: (int,), float: (int, float)}.get(type(f.default))
        if want and (not isinstance(value, want) or (isinstance(value, bool) and bool not in want)):
            kind = {(bool,): "true or false", (int,): "an integer"}.get(want, "a number")
            raise ValueError(f"{f.name}={value!r} is not {kind}")
        if want == (int, float) and not math.isfinite(value):  # nor would it be JSON in the recipe and report
            raise ValueError(f"{f.name}={value!r} is not a finite number")


def cli_options(cls=None) -> list[tuple[str, str, dict]]:
    """``(field name, flag, argparse keyword arguments)`` for every option of :class:`QuantConfig` (or ``cls``)."""
    out = []
    for f in fields(cls or QuantConfig):
        meta = dict(f.metadata)
        flag, kwargs = meta.pop("flag"), {"dest": f.name, "default": f.default, **meta}
        if f.type == "bool" or isinstance(f.default, bool):
            kwargs["action"] = "store_true"
        elif "const" in kwargs and "nargs" not in kwargs:
            kwargs["action"] = "store_const"
        else:  # a plain value, or an optional one (nargs="?": const when the flag comes alone)
            kwargs.setdefault("type", type(f.default) if f.default is not None else str)
        out.append((f.name, flag, kwargs))
    return out
