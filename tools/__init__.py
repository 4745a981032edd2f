"""The benchmarks and helpers around qpass, each run from the repository root as ``python -m tools.NAME``.

- ``bench_attention``: the int8 paged decode kernel against a float16 one (and FlashInfer), with KV-cache bytes per
  token.
- ``bench_calibrate``: calibration's cost against the float forward over the same tokens.
- ``bench_compile``: the time of the passes per layer, at 30 and 80 layers.
- ``bench_layerwise``: layer-wise calibration's peak memory against depth, and its time against the whole model's.
- ``bench_onnx``: qpass on SmolLM2's ONNX exports: accuracy, ONNX Runtime speed and pass times.
- ``bench_onnx_gqa``: ONNX Runtime's GroupQueryAttention with the int8 KV cache against its float cache.
- ``bench_refusals``: how soon ``qpass compile`` refuses each class of bad input on SmolLM2, in a process of its own.
- ``bench_run``: a MindIE W8A8 directory's integer inference against the float model on the CPU.
- ``bench_w8a8``: W8A8 + FAQuant + C8 with ``--disable-level auto`` per smoothing and activation method.
- ``make_corpus``: the standard-library corpus (calib.jsonl, eval_prose.txt, eval_code.txt).
- ``sweep_observers``: the perplexity increase of C8, FAQuant and the dynamic cache per range method and domain pair.

``common`` holds what several of them share; no tool imports another.
"""
