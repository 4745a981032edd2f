"""The ``qpass`` command: compile, eval, run, inspect. Bad input exits with status 2 and one line.

``qpass compile``'s quantization options come from :class:`qpass.core.config.QuantConfig` (flags, choices,
defaults and help live there); its output formats from the exporter registry.
"""

import argparse
import json
import sys

from qpass.core.config import EVAL_WINDOWS, QuantConfig, cli_options
from qpass.core.errors import QpassError
from qpass.exporters import LAYERWISE as LAYERWISE_FORMATS
from qpass.exporters import NAMES as FORMATS
from qpass.exporters.mindie_format import dynamic_kv_refusal


class _Parser(argparse.ArgumentParser):
    """argparse's parser with usage errors in one line (status 2), as qpass's other errors are."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qpass", description="Quantization compiler for LLM attention: FAQuant and int8 KV cache (C8).")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="capture, calibrate, insert Q/DQ, evaluate, write the program and report")
    c.add_argument("model", metavar="MODEL", help="Hugging Face model directory, .gguf file, `default` (SmolLM2-135M), "
                                                  "or an ONNX decoder (.onnx, or a directory holding model.onnx)")
    for _, flag, kwargs in cli_options():
        c.add_argument(flag, **kwargs)
    c.add_argument("--calib", help="calibration file: .jsonl (inputs_pretokenized or text per line) or plain text; default: the stdlib corpus")
    c.add_argument("--eval", help="evaluation text file (plain text, not used for calibration)")
    c.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS, help=f"at most this many eval windows (default {EVAL_WINDOWS})")
    c.add_argument("--recipe", help="reuse the calibration in this recipe directory (OUT/recipe of an earlier compile)")
    c.add_argument("-o", "--output", required=True, help="output directory (must be new or empty, or pass --force)")
    c.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    c.add_argument("--no-verify", action="store_true", help="skip the checks after each pass")
    c.add_argument("--tokenizer", help="tokenizer directory of an ONNX model (default: the tokenizer files next to it)")
    c.add_argument("--format", choices=FORMATS, default=None,
                   help="output (default: onnx for an ONNX model, else qpass): onnx (model.onnx with the int8 cache, "
                        "recipe/, tokenizer, genai_config.json where the input had one); qpass (program.pt2, recipe/, decoder.pt2); mindie (Ascend MindIE W8A8 weight directory as its "
                        "documentation says; needs --w8a8); vllm-ascend (the same directory as vllm-ascend loads it: "
                        "C8 needs --symmetric, no --fa-quant)")
    c.add_argument("--dtype", choices=("float16", "bfloat16"), help="model dtype of --format mindie / vllm-ascend (default float16)")
    c.add_argument("--layerwise", action="store_true", default=None,
                   help="calibrate a Hugging Face directory one decoder layer at a time from its safetensors, or run an ONNX "
                        "model in ONNX Runtime one layer's stage at a time (automatic when the model would not fit in memory); "
                        "--fa-quant, --kv-int8, --w8a8 with or without smoothing; writes recipe/, tokenizer/ and the report, "
                        "the MindIE / vllm-ascend directory, or the ONNX directory")

    e = sub.add_parser("eval", help="reload a compiled directory and measure its perplexity")
    e.add_argument("out", metavar="OUT", help="directory written by `qpass compile -o`, or a MindIE weight directory")
    e.add_argument("--eval", required=True, help="evaluation text file")
    e.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS, help=f"at most this many eval windows (default {EVAL_WINDOWS})")

    r = sub.add_parser("run", help="generate text greedily with the compiled decoder and its paged int8 KV cache")
    r.add_argument("out", metavar="OUT", help="directory written by `qpass compile -o`, or a MindIE weight directory")
    r.add_argument("--prompt", required=True, help="text to continue")
    r.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default 32)")

    i = sub.add_parser("inspect", help="list the attention sites found in MODEL")
    i.add_argument("model", metavar="MODEL", help="Hugging Face model directory, .gguf file, `default`, or an ONNX decoder")
    i.add_argument("--tokenizer", help="tokenizer directory of an ONNX model (default: the tokenizer files next to it)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised by the console script's own handler.

    A subclass, not KeyboardInterrupt itself: CPython flags a bare KeyboardInterrupt that leaves code run
    through PyRun_String (as pybind11's exec does) and then, even when `main` has handled it, ends the
    process by SIGINT instead of with `main`'s status (seen once in CI-like runs: status -2).
    """


def _interrupt(signum, frame):
    raise Interrupted  # unwinds like Ctrl-C: staged outputs are removed on the way out


def main(argv: list[str] | None = None) -> int:
    import signal

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # a usage error (one line, status 2) or --help: returned like any other outcome
        return done.code
    if argv is None:  # the console script owns the process; a caller of main() keeps its own handlers
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
    try:
        return {"compile": cmd_compile, "eval": cmd_eval, "inspect": cmd_inspect, "run": cmd_run}[args.command](args)
    except QpassError as err:
        print(f"qpass {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qpass: interrupted; nothing was written", file=sys.stderr)
        return 130


def cmd_compile(args) -> int:
    import qpass
    from qpass.api import check_output_dir, output_format, too_big
    from qpass.core.report import summary
    from qpass.exporters import registry

    check_output_dir(args.output, args.force)  # fail before the slow part
    args.format = output_format(args.model, args.format)
    check_format_args(args)
    if args.layerwise and args.format not in LAYERWISE_FORMATS:
        raise QpassError(f"--format {args.format} with --layerwise: a layer-wise compile writes {', '.join(LAYERWISE_FORMATS)}; "
                         "choose one of those")
    if args.format not in LAYERWISE_FORMATS and args.layerwise is None and not args.recipe and too_big(args.model, note=False):
        raise QpassError(f"MODEL {args.model}: its weights do not fit in this machine's memory for a whole-model compile, "
                         f"and a layer-wise compile does not write --format {args.format}; choose one of "
                         f"{', '.join(LAYERWISE_FORMATS)}, or compile on a machine with more memory")
    names = [name for name, _, _ in cli_options()]
    recipe = None
    if args.recipe:
        recipe = qpass.Recipe.load(args.recipe)
        asked = (args.fa_quant, args.kv_cache, args.w8a8)
        if any(asked) and asked != (recipe.config.fa_quant, recipe.config.kv_cache, recipe.config.w8a8):
            raise QpassError(f"--recipe {args.recipe}: calibrated for fa_quant={recipe.config.fa_quant}, kv_cache={recipe.config.kv_cache}, "
                             f"w8a8={recipe.config.w8a8}; drop --fa-quant/--kv-int8/--w8a8 to use it as it is, or recalibrate")
        if args.format != "qpass" and recipe.config.kv_cache == "dynamic":
            raise QpassError(dynamic_kv_refusal(args.format))
        config = recipe.config
    else:
        try:
            config = QuantConfig(**{name: getattr(args, name) for name in names})
        except ValueError as err:
            raise QpassError(str(err)) from None
    result = qpass.compile(args.model, config, calib=args.calib, eval=args.eval, recipe=recipe,
                           eval_windows=args.eval_windows, verify=not args.no_verify, tokenizer=args.tokenizer,
                           layerwise=args.layerwise)
    result.save(args.output, force=args.force, format=args.format, dtype=args.dtype)
    print(summary(result.report))
    files = registry.get(args.format).files
    if result.decoder is None:
        files = files.replace("decoder.pt2, ", "")
    if result.program is None:  # layer-wise: the recipe only
        files = files.replace("program.pt2, ", "")
    print(f"  wrote {args.output}/ ({files})")
    return 0


def check_format_args(args) -> None:
    """Refuse --format / --dtype combinations the weight-directory formats do not allow, before the slow part."""
    if args.format in ("qpass", "onnx"):
        if args.format == "onnx" and args.kv_cache == "dynamic":
            raise QpassError("--kv-int8 dynamic: qpass writes no per-token int8 cache form in ONNX; use --kv-int8 (static, per channel)")
        if args.dtype:
            raise QpassError(f"--dtype {args.dtype}: only --format mindie / vllm-ascend have a model dtype; drop --dtype")
        return
    if args.kv_cache == "dynamic":
        raise QpassError(dynamic_kv_refusal(args.format))
    if args.format == "vllm-ascend" and args.fa_quant:
        raise QpassError("--format vllm-ascend with --fa-quant: vllm-ascend loads attention quantization only as FAKQuant "
                         "on MLA models, and never together with C8; drop --fa-quant, or write --format mindie")
    if args.format == "vllm-ascend" and args.kv_cache and not args.symmetric and not args.recipe:
        raise QpassError("--format vllm-ascend with --kv-int8: vllm-ascend's decode dequantizes the int8 cache with its scale "
                         "only, so C8 must be symmetric; add --symmetric")
    if args.dtype == "bfloat16" and args.kv_cache:
        raise QpassError("--dtype bfloat16 with --kv-int8: MindIE's C8 (int8 KV cache) is documented for float16 weights only; "
                         "use --dtype float16, or drop --kv-int8")
    if not args.recipe and not args.w8a8:
        raise QpassError(f"--format {args.format}: the MindIE format is W8A8; add --w8a8 (or a --recipe calibrated with it)")


def cmd_eval(args) -> int:
    import qpass

    result = qpass.evaluate_saved(args.out, args.eval, args.eval_windows)
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


def cmd_run(args) -> int:
    import time

    import qpass

    start = time.perf_counter()
    prompt, new, tokenizer = qpass.generate(args.out, args.prompt, args.max_new_tokens)
    seconds = time.perf_counter() - start
    print(tokenizer.decode(prompt + new, skip_special_tokens=True))
    print(f"qpass run: {len(new)} tokens in {seconds:.2f}s ({len(new) / seconds:.1f} tokens/s, prefill and load "
          f"of {len(prompt)} prompt tokens included)", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    import qpass
    from qpass.api import site_info

    sites = [site_info(s) for s in qpass.inspect_model(args.model, tokenizer=args.tokenizer)]
    if args.json:
        print(json.dumps(sites, indent=1))
        return 0
    print(f"{'layer':>5} {'form':<21} {'heads':>5} {'kv':>3} {'dim':>4} {'rope':<5} {'qknorm':<6} q / k / v from")
    for s in sites:
        print(f"{s['layer']:>5} {s['form']:<21} {s['num_heads']:>5} {s['num_kv_heads']:>3} {s['head_dim']:>4} "
              f"{str(s['rope']):<5} {str(s['qk_norm']):<6} {s['q_from']} / {s['k_from']} / {s['v_from']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
