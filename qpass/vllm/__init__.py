"""qpass's vLLM plugin: vLLM serves what ``qpass compile --format vllm`` writes, its KV cache int8.

Installed with ``pip install 'qpass[vllm]'`` beside vLLM, it is loaded by vLLM in every process through the
``vllm.general_plugins`` entry point (:func:`register`). It registers

- the quantization method ``qpass`` (:mod:`qpass.vllm.quantization`), which a directory's ``quantization_config``
  names when it quantizes attention (:mod:`qpass.exporters.vllm_format`), and
- the attention backends ``QPASS_INT8`` and ``QPASS_INT8_DYNAMIC`` (:mod:`qpass.vllm.backend`), one of which that
  method puts on each attention layer.

A model whose config names another quantization method, or none, never reaches either: the plugin leaves it alone.
"""


def register() -> None:
    """vLLM's entry point: register the ``qpass`` quantization method and qpass's attention backends."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from qpass.vllm.backend import DYNAMIC_NAME, NAME

    for name, cls in ((NAME, "QpassInt8Backend"), (DYNAMIC_NAME, "QpassInt8DynamicBackend")):
        if name not in AttentionBackendEnum.__members__:
            register_backend(name, f"qpass.vllm.backend.{cls}")
    import qpass.vllm.quantization  # noqa: F401  (registers the "qpass" quantization method)
