"""Integer vs float inference on the CPU: a MindIE W8A8 directory (int8 x int8 -> int32 with ``torch._int_mm``)
against the float model it was exported from, on the same tokens, with the same thread count.

    python -m tools.bench_run                      # SmolLM2-135M (`default`)
    python -m tools.bench_run --model tiny         # a small random Llama, for a quick check

Calibration is qpass's W8A8 calibration with its defaults (per-tensor min-max of every decoder Linear's
input, no fallback) on 8 windows of the standard-library corpus (the W8A8 numbers do not change the speed). Prints
milliseconds for a prefill forward and for greedy decode steps (Hugging Face's float KV cache in both: this measures
the Linears), and the ratio integer / float (target: at most 1.0).
"""

import statistics
import tempfile
import time

import qpass
from qpass.core import corpus
from tools import common


def w8a8_recipe(model, tokenizer, ids):
    """A W8A8-only recipe of every decoder Linear, from qpass's calibration with its defaults."""
    from qpass.core.calibrate import calibrate
    from qpass.models.loaders import LoadedModel

    frontend = qpass.open_model(LoadedModel(model, tokenizer, "bench", "bench"), ids.shape[1])
    return calibrate(frontend, ids, qpass.QuantConfig(w8a8=True))


def load(spec: str):
    if spec != "tiny":
        loaded = qpass.load_model(spec)
        return loaded.model, loaded.tokenizer
    from transformers import AutoTokenizer

    from qpass.models.loaders import default_gguf_path
    from qpass.models.tiny import tiny_model

    path = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return tiny_model("llama", vocab_size=len(tokenizer), hidden_size=512, num_layers=4), tokenizer


def time_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def prefill(model, ids):
    import torch

    def run():
        with torch.no_grad():
            model(ids, use_cache=False)

    return run


def decode(model, ids, steps: int):
    import torch

    def run():
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    return run


def int8_model(model, recipe):
    """The MindIE W8A8 directory of ``model`` and ``recipe``, written and read back:
    ``(its model, the loader's info)``."""
    import torch

    # internals: the MindIE writer from a state dict and recipe, and its reader that builds the integer model
    from qpass.exporters.mindie_load import load as load_mindie
    from qpass.exporters.mindie_write import export_mindie

    with tempfile.TemporaryDirectory() as d:
        export_mindie(model.config.to_dict(), model.state_dict(), recipe, None, d, torch.float16)
        loaded = load_mindie(d, load_tokenizer=False)
    return loaded.model, loaded.info


def main() -> None:
    parser = common.parser(__doc__, __spec__.name)
    parser.add_argument(
        "--model", default="default", help="`default` (SmolLM2-135M), a Hugging Face directory, or `tiny`"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for both models (default: torch's own)"
    )
    parser.add_argument("--tokens", type=int, default=256, help="prompt tokens (prefill)")
    parser.add_argument("--decode-steps", type=int, default=16, help="greedy decode steps after the prompt")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    args = parser.parse_args()

    import torch

    from qpass.core.data import token_windows

    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    recipe = w8a8_recipe(model, tokenizer, common.calib_windows(tokenizer, 128, 8, "calibration"))
    int_model, info = int8_model(model, recipe)
    float_model = model  # both compute in float32 outside the W8A8 Linears
    ids = token_windows(tokenizer, [corpus.eval_prose()], args.tokens, 1, "bench")[:1]
    print(
        f"model {args.model}: {info['w8a8_linears']} W8A8 Linears; threads {args.threads}; "
        f"{ids.shape[1]} prompt tokens, "
        f"{args.decode_steps} decode steps; int8 matmul: torch._int_mm"
    )
    rows = []
    for label, make in (
        ("prefill", lambda m: prefill(m, ids)),
        ("decode", lambda m: decode(m, ids[:, :32], args.decode_steps)),
    ):
        f_ms = time_ms(make(float_model), args.repeats)
        i_ms = time_ms(make(int_model), args.repeats)
        rows.append((label, f_ms, i_ms))
        print(f"  {label:<8} float {f_ms:9.1f} ms   integer {i_ms:9.1f} ms   ratio integer/float {i_ms / f_ms:.3f}")
    worst = max(i / f for _, f, i in rows)
    print(
        f"ratio (worst of prefill, decode): {worst:.3f} ({'integer no slower' if worst <= 1.0 else 'integer SLOWER'})"
    )


if __name__ == "__main__":
    main()
