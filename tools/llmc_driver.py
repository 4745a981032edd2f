"""Runs llm-compressor's ``oneshot`` in its own environment (``.venv-llmc``) for ``tools.bench_llmcompressor``:
``.venv-llmc/bin/python tools/llmc_driver.py JOB.json`` quantizes a Hugging Face model with llm-compressor's W8A8
int8 recipe and saves the compressed-tensors checkpoint, then prints one line, ``RESULT {...}``: the versions and
the wall time. It imports nothing of qpass's.

JOB: ``{"model": DIR, "out": DIR, "calib": [[ids...], ...], "smoothing_strength": 0.8, "weights": "gptq"}``. The
calibration windows are token ids (qpass cut them from the same text, so both tools see the same tokens); they are
fed unshuffled, all of them, at their own length. The recipe is llm-compressor's W8A8 int8 example's:
``SmoothQuantModifier(smoothing_strength)`` then ``GPTQModifier`` (``"weights": "rtn"``: ``QuantizationModifier``,
round to nearest) on every ``Linear`` with the ``W8A8`` scheme (int8 symmetric weights per output channel, int8
symmetric activations per token computed at run time), ``lm_head`` ignored.
"""

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.llmc_driver", description=__doc__.split("\n\n")[0])
    parser.add_argument("job", help="the job, a JSON file (the module docstring)")
    job = json.loads(open(parser.parse_args().job, encoding="utf-8").read())
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    calib = job["calib"]
    data = Dataset.from_dict({"input_ids": calib, "attention_mask": [[1] * len(ids) for ids in calib]})
    weights = GPTQModifier if job.get("weights", "gptq") == "gptq" else QuantizationModifier
    recipe = [
        SmoothQuantModifier(smoothing_strength=job.get("smoothing_strength", 0.8)),
        weights(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
    ]
    oneshot(
        model=model,
        dataset=data,
        recipe=recipe,
        num_calibration_samples=len(calib),
        max_seq_length=max(len(ids) for ids in calib),
        shuffle_calibration_samples=False,
    )
    model.save_pretrained(job["out"], save_compressed=True)
    tokenizer.save_pretrained(job["out"])
    versions = {
        "llmcompressor": llmcompressor.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    print("RESULT " + json.dumps({"versions": versions, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
