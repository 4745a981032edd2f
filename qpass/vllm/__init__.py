"""qpass's vLLM plugin: vLLM serves what ``qpass compile --format vllm`` writes, its KV cache int8.

Installed with ``pip install 'qpass[vllm]'`` beside vLLM, it is loaded by vLLM in every process through the
``vllm.general_plugins`` entry point (:func:`register`). It registers

- the quantization method ``qpass`` (:mod:`qpass.vllm.quantization`), which a directory's ``quantization_config``
  names when it quantizes attention (:mod:`qpass.exporters.vllm_format`), and
- the attention backend ``QPASS_INT8`` (:mod:`qpass.vllm.backend`), which that method puts on each attention layer.

A model whose config names another quantization method, or none, never reaches either: the plugin leaves it alone.
"""


def register() -> None:
    """vLLM's entry point: register the ``qpass`` quantization method and the ``QPASS_INT8`` attention backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from qpass.vllm.backend import NAME

    if NAME not in AttentionBackendEnum.__members__:
        register_backend(NAME, "qpass.vllm.backend.QpassInt8Backend")
    import qpass.vllm.quantization  # noqa: F401  (registers the "qpass" quantization method)
