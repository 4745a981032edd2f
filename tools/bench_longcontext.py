"""One long document through a compiled directory's paged int8 decoder and through the float model: the NLL increase
by position bucket, the time and the peak memory of each part (the long-context check's documents half, without the
passkey grid, for contexts where the whole check would take too long).

python -m tools.bench_longcontext out/lc-c8 --context 8192 --decode 4
"""

import json
import resource
import time
from pathlib import Path

from tools import common


def main() -> None:
    parser = common.parser(__doc__, __spec__.name)
    parser.add_argument("directory", type=Path, help="a directory `qpass compile` wrote (qpass or MindIE format)")
    parser.add_argument("--context", type=int, default=8192, help="tokens of the document (default: %(default)s)")
    parser.add_argument("--decode", type=int, default=4, help="last tokens fed one call each (default: %(default)s)")
    parser.add_argument("--float", dest="float_model", default="default", help="the float model (default: SmolLM2)")
    args = parser.parse_args()

    from qpass.core.longcontext import bucket_table, documents
    from qpass.exporters import registry
    from qpass.frontends.torch_export import longcontext
    from qpass.models.loaders import load_model

    def peak_gib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    loaded = registry.detect(args.directory).load(args.directory, "run")
    model = load_model(args.float_model).model
    record = {"directory": str(args.directory), "context": args.context, "decode": args.decode}
    start = time.perf_counter()
    program, record["decoder"] = longcontext.paged_decoder(loaded, args.context, model)
    record["decoder_s"], record["decoder_peak_gib"] = round(time.perf_counter() - start, 1), round(peak_gib(), 2)
    ids = documents(loaded.tokenizer, args.context, 1)[0].ids
    start = time.perf_counter()
    quant, _ = longcontext.paged_scores(program, ids, args.context - args.decode)
    record["paged_s"], record["paged_peak_gib"] = round(time.perf_counter() - start, 1), round(peak_gib(), 2)
    start = time.perf_counter()
    flt, _ = longcontext.float_scores(model, ids)
    record["float_s"] = round(time.perf_counter() - start, 1)
    record["buckets"] = bucket_table(args.context, [flt], [quant])
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
