"""What to quantize and how: decided once, validated on construction, read by the passes."""

from dataclasses import asdict, dataclass

OBSERVERS = ("minmax", "percentile", "mse")
KV_CACHE = (None, "int8")


@dataclass(frozen=True)
class QuantConfig:
    """The quantization policy of one compile.

    fa_quant: FAQuant, Q, K and V after RoPE quantized per head and per dim (``[heads, head_dim]``);
        the KV cache is then int8 too.
    kv_cache: ``"int8"`` for C8, K and V quantized per channel (``[kv_heads * head_dim]``) where they
        are written to the cache; None keeps the cache in float.
    observer: how a calibration range is chosen: ``minmax``; ``percentile`` (clip at ``percentile``
        of |x| per channel); ``mse`` (clip range searched on a histogram to minimise the L2 error).
    symmetric: symmetric int8 (offset 0, [-127, 127]) instead of asymmetric.
    """

    fa_quant: bool = False
    kv_cache: str | None = None
    observer: str = "mse"
    symmetric: bool = False
    percentile: float = 99.99
    calib_samples: int = 64
    window: int = 512
    batch_size: int = 4

    def __post_init__(self):
        if not self.fa_quant and self.kv_cache is None:
            raise ValueError("nothing to quantize: set fa_quant=True and/or kv_cache='int8' (--fa-quant / --kv-int8)")
        if self.kv_cache not in KV_CACHE:
            raise ValueError(f"kv_cache={self.kv_cache!r} is not supported; use 'int8' or None")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer={self.observer!r} is not one of {', '.join(OBSERVERS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile={self.percentile} must be in (50, 100]")
        for name in ("calib_samples", "window", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)
