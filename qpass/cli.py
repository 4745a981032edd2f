"""The ``qpass`` command: compile, eval, run, inspect. Bad input exits with status 2 and one line.

``qpass compile``'s quantization options come from :class:`qpass.core.config.QuantConfig` (flags, choices,
defaults and help live there); its output formats from the exporter registry.
"""

import argparse
import json
import sys
from pathlib import Path

from qpass.core.config import QuantConfig, RunSettings, cli_options
from qpass.core.errors import QpassError
from qpass.exporters import NAMES as FORMATS


class _Parser(argparse.ArgumentParser):
    """argparse's parser with usage errors in one line (status 2), as qpass's other errors are."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qpass", description="Quantization compiler for LLM attention: FAQuant and int8 KV cache (C8)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _compile_parser(
        sub.add_parser("compile", help="capture, calibrate, insert Q/DQ, evaluate, write the program and report")
    )
    _eval_parser(sub.add_parser("eval", help="reload a compiled directory and measure its perplexity"))
    r = sub.add_parser("run", help="generate text greedily with the compiled decoder and its paged int8 KV cache")
    r.add_argument(
        "out",
        metavar="OUT",
        help="directory written by `qpass compile -o` (any --format), or a MindIE weight directory",
    )
    r.add_argument("--prompt", required=True, help="text to continue")
    r.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default 32)")
    i = sub.add_parser("inspect", help="list the attention sites found in MODEL")
    i.add_argument(
        "model", metavar="MODEL", help="Hugging Face model directory, .gguf file, `default`, or an ONNX decoder"
    )
    i.add_argument("--tokenizer", help="tokenizer directory of an ONNX model (default: the tokenizer files next to it)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _compile_parser(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "model",
        metavar="MODEL",
        help="Hugging Face model directory, .gguf file, `default` (SmolLM2-135M), "
        "or an ONNX decoder (.onnx, or a directory holding model.onnx)",
    )
    for _, flag, kwargs in cli_options(QuantConfig) + cli_options(RunSettings):
        c.add_argument(flag, **kwargs)
    c.add_argument(
        "--calib",
        help="calibration file: .jsonl (inputs_pretokenized or text per line) or plain text; "
        "default: the stdlib corpus",
    )
    c.add_argument("--eval", help="evaluation text file (plain text, not used for calibration)")
    c.add_argument(
        "--recipe",
        help="reuse the calibration in this recipe directory (OUT/recipe of an earlier "
        "compile); its policy is kept, the run settings (--window, --batch-size, "
        "--eval-windows) are this run's",
    )
    c.add_argument("-o", "--output", required=True, help="output directory (must be new or empty, or pass --force)")
    c.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    c.add_argument("--no-verify", action="store_true", help="skip the checks after each pass")
    c.add_argument("--tokenizer", help="tokenizer directory of an ONNX model (default: the tokenizer files next to it)")
    c.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="output (default: onnx for an ONNX model, else qpass): onnx (model.onnx with the int8 cache, "
        "recipe/, tokenizer, genai_config.json where the input had one); qpass (program.pt2, recipe/, decoder.pt2); "
        "mindie (Ascend MindIE W8A8 weight directory as its "
        "documentation says; needs --w8a8); vllm-ascend (the same directory as vllm-ascend loads it: "
        "C8 needs --symmetric, no --fa-quant)",
    )
    c.add_argument(
        "--dtype",
        choices=("float16", "bfloat16"),
        help="model dtype of --format mindie / vllm-ascend (default float16)",
    )
    c.add_argument(
        "--long-context",
        type=int,
        metavar="N",
        help="also run the long-context check over N tokens on what was written (as `qpass eval OUT --context N`): "
        "into report.json, report.txt and longcontext.png; off by default",
    )
    c.add_argument(
        "--layerwise",
        action="store_true",
        default=None,
        help="calibrate a Hugging Face directory one decoder layer at a time from its safetensors, or run an ONNX "
        "model in ONNX Runtime one layer's stage at a time (automatic when the model would not fit in memory); "
        "--fa-quant, --kv-int8, --w8a8 with or without smoothing; writes recipe/, tokenizer/ and the report, "
        "the MindIE / vllm-ascend directory, or the ONNX directory",
    )


def _eval_parser(e: argparse.ArgumentParser) -> None:
    e.add_argument(
        "out",
        metavar="OUT",
        help="directory written by `qpass compile -o` (any --format), or a MindIE weight directory",
    )
    e.add_argument(
        "--eval", help="evaluation text file (required without --context; with it, the long documents' text)"
    )
    for name, flag, kwargs in cli_options(RunSettings):
        if name in ("batch_size", "eval_windows"):  # the window is the one the directory was compiled for
            e.add_argument(flag, **kwargs)
    e.add_argument(
        "--float",
        dest="float_model",
        metavar="MODEL",
        help="the float model to measure beside it (default: the one its report.json names, if still there)",
    )
    e.add_argument("--no-float", dest="float_model", action="store_false", help="measure the quantized model only")
    e.add_argument("--json", action="store_true", help="print the full JSON record instead of the summary")
    e.add_argument(
        "--context",
        type=int,
        metavar="N",
        help="the long-context check instead of perplexity: NLL by position bucket over documents of N tokens "
        "(--eval's text, default the stdlib evaluation modules' sources) and passkey retrieval at N/4, N/2, N "
        "tokens, the quantized model through its paged int8 cache (prefill, then token by token), float beside it",
    )
    e.add_argument(
        "--documents",
        type=int,
        default=None,
        metavar="K",
        help="documents of the long-context check (default 4; with --context)",
    )
    e.add_argument("--plot", metavar="PNG", help="draw the long-context check into this PNG file (with --context)")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised by the console script's own handler.

    A subclass, not KeyboardInterrupt itself: CPython flags a bare KeyboardInterrupt that leaves code run
    through PyRun_String (as pybind11's exec does) and then, even when `main` has handled it, ends the
    process by SIGINT instead of with `main`'s status (seen once in CI-like runs: status -2).
    """


def _interrupt(signum, frame):
    raise Interrupted  # unwinds like Ctrl-C: half-written outputs are removed on the way out


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
    from qpass.api import output_format
    from qpass.core.output import check_output_dir
    from qpass.core.report import read, summary
    from qpass.exporters import registry

    inputs = (args.model, args.calib, args.eval, args.recipe, args.tokenizer)
    check_output_dir(args.output, args.force, inputs)  # fail before the slow part
    run, recipe = _settings(args, RunSettings), None
    if args.recipe:  # its policy, and no flag that says otherwise
        recipe = qpass.Recipe.load(args.recipe)
        _check_recipe_flags(args, recipe.config)
        config = recipe.config
    else:
        config = _settings(args, QuantConfig)
    args.format = output_format(args.model, args.format, config, args.dtype)
    if args.long_context is not None:
        from qpass.core.longcontext import check_context

        check_context(args.long_context, None, "--long-context")  # before the slow part
    result = qpass.compile(
        args.model,
        config,
        calib=args.calib,
        eval=args.eval,
        recipe=recipe,
        run=run,
        verify=not args.no_verify,
        tokenizer=args.tokenizer,
        layerwise=args.layerwise,
    )
    if args.long_context is not None:
        from qpass.core.longcontext import check_context

        positions = result.compiled.config_json.get("max_position_embeddings")
        check_context(args.long_context, positions, "--long-context")  # before anything is written
        if args.format == "qpass" and result.decoder is None:
            why = result.report.get("decoder", {}).get("skipped") or "a layer-wise compile writes the recipe only"
            raise QpassError(f"--long-context: this compile lowers no paged decoder to check ({why})")
    result.save(args.output, force=args.force, format=args.format, dtype=args.dtype)
    if args.long_context is not None:
        _long_context(args)
        result.report = read(Path(args.output))
    print(summary(result.report))
    files = registry.get(args.format).files
    if result.decoder is None:
        files = files.replace("decoder.pt2, ", "")
    if result.program is None:  # layer-wise: the recipe only
        files = files.replace("program.pt2, ", "")
    print(f"  wrote {args.output}/ ({files})")
    return 0


def _long_context(args) -> None:
    """``qpass compile --long-context N``: the check of ``qpass eval OUT --context N`` on what was just written, the
    compiled model beside it; into OUT's report (``long_context``, its warnings) and ``longcontext.png``."""
    import qpass
    from qpass.core.report import LONG_CONTEXT_PLOT, read, write

    out = Path(args.output)
    section = qpass.long_context(out, args.long_context, float_model=args.model, plot=out / LONG_CONTEXT_PLOT)
    report = read(out)
    report["long_context"] = section
    report["warnings"] = report.get("warnings", []) + section["warnings"]
    write(report, out)


def _settings(args, cls):
    """``cls`` (:class:`QuantConfig` or :class:`RunSettings`) from the parsed options; its refusal in one line."""
    names = [name for name, _, _ in cli_options(cls)]
    try:
        return cls(**{name: getattr(args, name) for name in names})
    except ValueError as err:
        raise QpassError(str(err)) from None


def _check_recipe_flags(args, calibrated: QuantConfig) -> None:
    """Refuse a policy flag that says otherwise than the recipe ``--recipe`` reuses (it would be silently dropped)."""
    asked = {
        name: (flag, getattr(args, name))
        for name, flag, kwargs in cli_options(QuantConfig)
        if getattr(args, name) != kwargs["default"]
    }
    differ = [
        f"{flag} ({name}={getattr(calibrated, name)!r} in the recipe)"
        for name, (flag, value) in asked.items()
        if value != getattr(calibrated, name)
    ]
    if differ:
        raise QpassError(
            f"--recipe {args.recipe}: calibrated otherwise than {', '.join(differ)}; drop those flags "
            "to use it as it is, or recalibrate"
        )


def cmd_eval(args) -> int:
    import qpass
    from qpass.core.report import eval_summary, long_context_summary

    if args.context is not None:
        result = qpass.long_context(
            args.out,
            args.context,
            **({} if args.documents is None else {"documents": args.documents}),
            eval=args.eval,
            float_model=args.float_model,
            plot=args.plot,
        )
        print(json.dumps(result, indent=1, sort_keys=True) if args.json else long_context_summary(result))
        return 0
    for flag, value in (("--documents", args.documents), ("--plot", args.plot)):
        if value is not None:
            raise QpassError(f"{flag}: it sets the long-context check; add --context N")
    if args.eval is None:
        raise QpassError("--eval: give an evaluation text file (or --context N for the long-context check)")
    result = qpass.evaluate_saved(args.out, args.eval, args.eval_windows, args.batch_size, args.float_model)
    print(json.dumps(result, indent=1, sort_keys=True) if args.json else eval_summary(result))
    return 0


def cmd_run(args) -> int:
    import time

    import qpass

    start = time.perf_counter()
    prompt, new, tokenizer = qpass.generate(args.out, args.prompt, args.max_new_tokens)
    seconds = time.perf_counter() - start
    print(tokenizer.decode(prompt + new, skip_special_tokens=True))
    print(
        f"qpass run: {len(new)} tokens in {seconds:.2f}s ({len(new) / seconds:.1f} tokens/s, prefill and load "
        f"of {len(prompt)} prompt tokens included)",
        file=sys.stderr,
    )
    return 0


def cmd_inspect(args) -> int:
    import qpass
    from qpass.core.compile import site_info

    sites = [site_info(s) for s in qpass.inspect_model(args.model, tokenizer=args.tokenizer)]
    if args.json:
        print(json.dumps(sites, indent=1))
        return 0
    print(f"{'layer':>5} {'form':<21} {'heads':>5} {'kv':>3} {'dim':>4} {'rope':<5} {'qknorm':<6} q / k / v from")
    for s in sites:
        print(
            f"{s['layer']:>5} {s['form']:<21} {s['num_heads']:>5} {s['num_kv_heads']:>3} {s['head_dim']:>4} "
            f"{str(s['rope']):<5} {str(s['qk_norm']):<6} {s['q_from']} / {s['k_from']} / {s['v_from']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
