"""Runs vLLM in its own environment (``.venv-vllm``) for the plugin's tests and benchmarks: ``python vllm_driver.py
JOB.json`` prints one JSON line, ``RESULT {...}``, with what the job asked for.

JOB: ``{"model": DIR, "dtype": "float32", "tp": 1, "kv_cache_memory_bytes": N, "generate": [[ids...], ...],
"max_tokens": 8, "logprobs": [[ids...], ...]}``. The result holds the greedy token ids of each ``generate`` prompt,
the summed next-token NLL and token count of each ``logprobs`` window (vLLM's ``prompt_logprobs``), the engine's
cache figures (blocks, block size, bytes) and the attention backend each layer runs.
"""

import json
import os
import sys


def main(job_file: str) -> None:
    job = json.loads(open(job_file, encoding="utf-8").read())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        job["model"],
        dtype=job.get("dtype", "float32"),
        enforce_eager=True,
        tensor_parallel_size=job.get("tp", 1),
        max_model_len=job.get("max_model_len", 512),
        max_num_seqs=job.get("max_num_seqs", 8),
        gpu_memory_utilization=0.05,
        kv_cache_memory_bytes=job.get("kv_cache_memory_bytes", 1 << 26),
        seed=0,
    )
    result = {}
    if job.get("generate"):
        params = SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0.0, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["generate"]], params, use_tqdm=False)
        result["generated"] = [list(o.outputs[0].token_ids) for o in outs]
    if job.get("logprobs"):
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["logprobs"]], params, use_tqdm=False)
        nll = []
        for ids, o in zip(job["logprobs"], outs):
            nll.append(-sum(o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))))
        result["nll_sum"] = nll
    cache = llm.llm_engine.vllm_config.cache_config
    result["cache"] = {"num_blocks": cache.num_gpu_blocks, "block_size": cache.block_size}
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and job.get("tp", 1) == 1:
        core = llm.llm_engine.engine_core.engine_core
        runner = core.model_executor.driver_worker.worker.model_runner
        layers = runner.vllm_config.compilation_config.static_forward_context
        result["backends"] = sorted({type(layer.impl).__name__ for layer in layers.values()})
        result["cache_dtypes"] = sorted({str(layer.kv_cache_torch_dtype) for layer in layers.values()})
        result["kv_cache_bytes"] = sum(t.numel() * t.element_size() for t in runner.kv_caches)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
