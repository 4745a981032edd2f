"""The ``qpass`` command: compile, eval, run, inspect. Bad input exits with status 2 and one line."""

import argparse
import json
import sys

from qpass.errors import QpassError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qpass", description="Quantization compiler for LLM attention: FAQuant and int8 KV cache (C8).")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="capture, calibrate, insert Q/DQ, evaluate, write the program and report")
    c.add_argument("model", metavar="MODEL", help="Hugging Face model directory, .gguf file, or `default` (SmolLM2-135M)")
    c.add_argument("--fa-quant", action="store_true", help="FAQuant: Q, K, V int8 per head and dim (KV cache int8 too)")
    c.add_argument("--kv-int8", action="store_true", help="C8: K and V int8 per channel where written to the cache")
    c.add_argument("--calib", help="calibration file: .jsonl (inputs_pretokenized or text per line) or plain text; default: the stdlib corpus")
    c.add_argument("--eval", help="evaluation text file (plain text, not used for calibration)")
    c.add_argument("--recipe", help="reuse the calibration in this recipe directory (OUT/recipe of an earlier compile)")
    c.add_argument("-o", "--output", required=True, help="output directory (must be new or empty, or pass --force)")
    c.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    c.add_argument("--observer", choices=("minmax", "percentile", "mse"), default="mse", help="range choice (default mse: histogram search)")
    c.add_argument("--percentile", type=float, default=99.99, help="clip percentile for --observer percentile (default 99.99)")
    c.add_argument("--symmetric", action="store_true", help="symmetric int8 (offset 0) instead of asymmetric")
    c.add_argument("--window", type=int, default=512, help="tokens per window for calibration and eval (default 512)")
    c.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default 64)")
    c.add_argument("--eval-windows", type=int, default=32, help="at most this many eval windows (default 32)")
    c.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    c.add_argument("--no-verify", action="store_true", help="skip the checks after each pass")
    c.add_argument("--w8a8", action="store_true", help="W8A8: every decoder Linear int8 x int8 (weights per channel, activations per tensor)")
    c.add_argument("--act-method", type=int, choices=(1, 2, 3), default=1,
                   help="W8A8 activation range: 1 min-max (default), 2 histogram, 3 auto per Linear (histogram when max|x|/std <= 50)")
    c.add_argument("--anti-method", choices=("m1", "m2", "m3", "m4"),
                   help="anti-outlier smoothing: m1 SmoothQuant, m2 SmoothQuant on shifted ranges, m3 activation-aware (searched), m4 iterative")
    c.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength for m1/m2 (default 0.5)")
    c.add_argument("--disable-level", default="L0",
                   help="Linears kept float: L0 none (default), Ln the n with the widest activation range (e.g. L5), auto")
    c.add_argument("--max-ppl-increase", type=float, default=2.0,
                   help="--disable-level auto: perplexity increase allowed on held-out calibration text (95%% upper bound), percent (default 2)")
    c.add_argument("--format", choices=("qpass", "mindie"), default="qpass",
                   help="output: qpass (program.pt2, recipe/, decoder.pt2) or mindie (Ascend MindIE W8A8 weight directory; needs --w8a8)")
    c.add_argument("--dtype", choices=("float16", "bfloat16"), help="model dtype of --format mindie (default float16)")

    e = sub.add_parser("eval", help="reload a compiled directory and measure its perplexity")
    e.add_argument("out", metavar="OUT", help="directory written by `qpass compile -o`, or a MindIE weight directory")
    e.add_argument("--eval", required=True, help="evaluation text file")
    e.add_argument("--eval-windows", type=int, default=32, help="at most this many eval windows (default 32)")

    r = sub.add_parser("run", help="generate text greedily with the compiled decoder and its paged int8 KV cache")
    r.add_argument("out", metavar="OUT", help="directory written by `qpass compile -o`, or a MindIE weight directory")
    r.add_argument("--prompt", required=True, help="text to continue")
    r.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default 32)")

    i = sub.add_parser("inspect", help="list the attention sites found in MODEL")
    i.add_argument("model", metavar="MODEL", help="Hugging Face model directory, .gguf file, or `default`")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    from qpass.api import check_output_dir
    from qpass.config import QuantConfig
    from qpass.report import summary

    check_output_dir(args.output, args.force)  # fail before the slow part
    check_format_args(args)
    recipe = None
    if args.recipe:
        recipe = qpass.Recipe.load(args.recipe)
        asked = (args.fa_quant, "int8" if args.kv_int8 else None, args.w8a8)
        if (args.fa_quant or args.kv_int8 or args.w8a8) and asked != (recipe.config.fa_quant, recipe.config.kv_cache, recipe.config.w8a8):
            raise QpassError(f"--recipe {args.recipe}: calibrated for fa_quant={recipe.config.fa_quant}, kv_cache={recipe.config.kv_cache}, "
                             f"w8a8={recipe.config.w8a8}; drop --fa-quant/--kv-int8/--w8a8 to use it as it is, or recalibrate")
        config = recipe.config
    else:
        try:
            config = QuantConfig(fa_quant=args.fa_quant, kv_cache="int8" if args.kv_int8 else None, observer=args.observer,
                                 symmetric=args.symmetric, percentile=args.percentile, calib_samples=args.calib_samples,
                                 window=args.window, batch_size=args.batch_size, w8a8=args.w8a8, act_method=args.act_method,
                                 anti_method=args.anti_method, alpha=args.alpha, disable_level=args.disable_level,
                                 max_ppl_increase=args.max_ppl_increase)
        except ValueError as err:
            raise QpassError(str(err)) from None
    result = qpass.compile(args.model, config, calib=args.calib, eval=args.eval, recipe=recipe,
                           eval_windows=args.eval_windows, verify=not args.no_verify)
    result.save(args.output, force=args.force, format=args.format, dtype=args.dtype or "float16")
    print(summary(result.report))
    files = ("quant_model_weight_w8a8.safetensors, quant_model_description.json, config.json, tokenizer" if args.format == "mindie"
             else "program.pt2, " + ("decoder.pt2, " if result.decoder is not None else "") + "recipe/, tokenizer/")
    print(f"  wrote {args.output}/ ({files}, report.json, report.txt, report.png)")
    return 0


def check_format_args(args) -> None:
    """Refuse --format / --dtype combinations the MindIE format does not allow, before the slow part."""
    if args.format != "mindie":
        if args.dtype:
            raise QpassError(f"--dtype {args.dtype}: only --format mindie has a model dtype; add --format mindie or drop --dtype")
        return
    if args.dtype == "bfloat16" and args.kv_int8:
        raise QpassError("--dtype bfloat16 with --kv-int8: MindIE's C8 (int8 KV cache) is documented for float16 weights only; "
                         "use --dtype float16, or drop --kv-int8")
    if not args.recipe and not getattr(args, "w8a8", False):
        raise QpassError("--format mindie: the MindIE format is W8A8; add --w8a8 (or a --recipe calibrated with it)")


def cmd_eval(args) -> int:
    import qpass

    result = qpass.evaluate_saved(args.out, args.eval, args.eval_windows)
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


def cmd_run(args) -> int:
    import time

    from qpass.generate import generate_lowered, load_decoder

    if args.max_new_tokens < 1:
        raise QpassError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    from qpass.mindie import generate_mindie, is_mindie_dir, load_mindie

    if is_mindie_dir(args.out):
        loaded = load_mindie(args.out)
        tokenizer = loaded.tokenizer
        prompt = tokenizer(args.prompt)["input_ids"]
        start = time.perf_counter()
        new = generate_mindie(loaded, prompt, args.max_new_tokens)
    else:
        program, tokenizer = load_decoder(args.out)
        prompt = tokenizer(args.prompt)["input_ids"]
        start = time.perf_counter()
        new = generate_lowered(program, prompt, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    print(tokenizer.decode(prompt + new, skip_special_tokens=True))
    print(f"qpass run: {len(new)} tokens in {seconds:.2f}s ({len(new) / seconds:.1f} tokens/s, prefill of "
          f"{len(prompt)} prompt tokens included)", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    import qpass
    from qpass.api import site_info

    sites = [site_info(s) for s in qpass.inspect_model(args.model)]
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
