"""Write the standard-library corpus: calib.jsonl, eval_prose.txt, eval_code.txt (disjoint modules).

python -m tools.make_corpus OUT_DIR
"""

from pathlib import Path

from qpass.core import corpus
from tools import common


def main() -> None:
    parser = common.parser(__doc__, __spec__.name)
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="where to write the three files")
    args = parser.parse_args()
    for name, path in corpus.write(args.out_dir).items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
