"""Real text that every Python install carries: the standard library's docstrings (prose) and sources (code).

Calibration and evaluation use disjoint module sets, so evaluation text is never seen in calibration.
The selection is fixed, so the same Python gives the same corpus.
"""

import ast
import json
import sysconfig
from pathlib import Path

CALIBRATION_MODULES = ("argparse", "collections/__init__", "csv", "dataclasses", "datetime", "email/message",
                       "fractions", "functools", "heapq", "json/decoder", "logging/__init__", "pathlib",
                       "shutil", "string", "textwrap", "threading", "typing", "zipfile")
EVAL_PROSE_MODULES = ("asyncio/events", "calendar", "configparser", "decimal", "difflib", "inspect", "pydoc",
                      "statistics", "subprocess", "tarfile", "unittest/case", "urllib/parse")
EVAL_CODE_MODULES = ("ast", "bisect", "enum", "glob", "ipaddress", "locale", "pprint", "queue", "random",
                     "tokenize", "traceback", "uuid")


def _source(module: str) -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py").read_text(encoding="utf-8")


def docstrings(module: str) -> list[str]:
    """The module's, classes' and functions' docstrings, in source order."""
    tree = ast.parse(_source(module))
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return [d for n in nodes if (d := ast.get_docstring(n)) and len(d) > 80]


def calibration_samples() -> list[str]:
    """Calibration samples: per module, its docstrings as prose and its source as code."""
    samples = []
    for module in CALIBRATION_MODULES:
        samples.append("\n\n".join(docstrings(module)))
        samples.append(_source(module))
    return samples


def eval_prose() -> str:
    return "\n\n".join(d for m in EVAL_PROSE_MODULES for d in docstrings(m))


def eval_code() -> str:
    return "\n\n".join(_source(m) for m in EVAL_CODE_MODULES)


def write(directory: Path) -> dict[str, Path]:
    """Write ``calib.jsonl``, ``eval_prose.txt`` and ``eval_code.txt`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"calib": directory / "calib.jsonl", "prose": directory / "eval_prose.txt", "code": directory / "eval_code.txt"}
    with paths["calib"].open("w", encoding="utf-8") as f:
        for sample in calibration_samples():
            f.write(json.dumps({"text": sample}) + "\n")
    paths["prose"].write_text(eval_prose(), encoding="utf-8")
    paths["code"].write_text(eval_code(), encoding="utf-8")
    return paths
