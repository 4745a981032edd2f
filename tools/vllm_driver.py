"""Runs vLLM in its own environment (``.venv-vllm``) for the plugin's tests and ``tools.bench_vllm``:
``.venv-vllm/bin/python tools/vllm_driver.py JOB.json`` prints one JSON line, ``RESULT {...}``, with what the job
asked for. It imports nothing of qpass's (vLLM loads qpass's plugin itself, by its entry point).

JOB: ``{"model": DIR, "dtype": "float32", "tp": 1, "kv_cache_memory_bytes": N, "generate": [[ids...], ...],
"generate_after": [[ids...], ...], "max_tokens": 8, "logprobs": [[ids...], ...]}`` and engine settings
(``max_num_batched_tokens``, ``block_size``, ``enable_prefix_caching``). The result holds the greedy token ids of
each ``generate`` prompt (and of ``generate_after``'s, a second batch, with the prefix cache's hits), the summed
next-token NLL and token count of each ``logprobs`` window (vLLM's ``prompt_logprobs``), the engine's cache figures
(blocks, block size, bytes), the attention backend each layer runs and the compressed-tensors scheme of each
quantized Linear layer (its class, and whether its input scale is static).

``"bench": {"batches": [1, 8], "decode": 16}`` with ``"bench_prompts"`` times, for each batch size, the prefill of
that many prompts new to the prefix cache and the decode of ``decode`` more tokens each (vLLM's own timestamps).
"""

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.vllm_driver", description=__doc__.split("\n\n")[0])
    parser.add_argument("job", help="the job, a JSON file (the module docstring)")
    job = json.loads(open(parser.parse_args().job, encoding="utf-8").read())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        job["model"],
        dtype=job.get("dtype", "float32"),
        enforce_eager=True,
        tensor_parallel_size=job.get("tp", 1),
        max_model_len=job.get("max_model_len", 512),
        max_num_seqs=job.get("max_num_seqs", 8),
        max_num_batched_tokens=job.get("max_num_batched_tokens"),
        block_size=job.get("block_size"),
        enable_prefix_caching=job.get("enable_prefix_caching", True),
        kv_cache_dtype=job.get("kv_cache_dtype", "auto"),
        gpu_memory_utilization=0.05,
        kv_cache_memory_bytes=job.get("kv_cache_memory_bytes", 1 << 26),
        seed=0,
        disable_log_stats=False,  # get_metrics() counts the prefix cache's hits
    )
    result = {}
    if job.get("generate"):
        params = SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0.0, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["generate"]], params, use_tqdm=False)
        result["generated"] = [list(o.outputs[0].token_ids) for o in outs]
    if job.get("generate_after"):  # a second batch, after the first finished (its blocks in the prefix cache)
        params = SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0.0, ignore_eos=True)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["generate_after"]]
        result["generated_after"] = [
            list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)
        ]
        result["prefix_cache_hits"] = sum(
            m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits" and hasattr(m, "value")
        )
    if job.get("logprobs"):
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["logprobs"]], params, use_tqdm=False)
        nll = []
        for ids, o in zip(job["logprobs"], outs):
            nll.append(-sum(o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))))
        result["nll_sum"] = nll
    if job.get("bench"):
        result["bench"] = bench(llm, job["bench"], job["bench_prompts"])
    cache = llm.llm_engine.vllm_config.cache_config
    result["cache"] = {"num_blocks": cache.num_gpu_blocks, "block_size": cache.block_size}
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and job.get("tp", 1) == 1:
        core = llm.llm_engine.engine_core.engine_core
        runner = core.model_executor.driver_worker.worker.model_runner
        layers = runner.vllm_config.compilation_config.static_forward_context
        result["backends"] = sorted({type(layer.impl).__name__ for layer in layers.values()})
        result["cache_dtypes"] = sorted({str(layer.kv_cache_torch_dtype) for layer in layers.values()})
        result["kv_cache_bytes"] = sum(t.numel() * t.element_size() for t in runner.kv_caches)
        # each quantized Linear layer's compressed-tensors scheme: class, static input scale or per token
        result["schemes"] = {
            name: [type(m.scheme).__name__, bool(getattr(m.scheme, "is_static_input_scheme", False))]
            for name, m in runner.get_model().named_modules()
            if getattr(m, "scheme", None) is not None
        }
    print("RESULT " + json.dumps(result), flush=True)


def bench(llm, settings: dict, prompts: list[list[int]]) -> list[dict]:
    """For each batch size, that many prompts not seen before, each decoding ``decode`` tokens after its first: the
    prefill's seconds (scheduled to the last first token) and the decode's (the last first token to the last
    token), from vLLM's own per-request timestamps."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out, at = [], 0
    for b in settings["batches"]:
        batch = [TokensPrompt(prompt_token_ids=ids) for ids in prompts[at : at + b]]
        at += b
        params = SamplingParams(max_tokens=1 + settings["decode"], temperature=0.0, ignore_eos=True)
        metrics = [o.metrics for o in llm.generate(batch, params, use_tqdm=False)]
        first = max(m.first_token_ts for m in metrics)
        prefill_s = first - min(m.scheduled_ts for m in metrics)
        decode_s = max(m.last_token_ts for m in metrics) - first
        out.append(
            {
                "batch": b,
                "prefill_s": prefill_s,
                "decode_s": decode_s,
                "prefill_tokens_per_s": sum(len(p["prompt_token_ids"]) for p in batch) / prefill_s,
                "decode_tokens_per_s": b * settings["decode"] / decode_s,
            }
        )
    return out


if __name__ == "__main__":
    main()
