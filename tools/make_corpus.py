"""Write the standard-library corpus: calib.jsonl, eval_prose.txt, eval_code.txt (disjoint modules).

    python tools/make_corpus.py OUT_DIR
"""

import sys
from pathlib import Path

from qpass.core import corpus

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for name, path in corpus.write(Path(sys.argv[1])).items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")
