"""Real text that every Python install carries: the standard library's docstrings (prose) and sources (code).

Calibration and evaluation use disjoint module sets, so evaluation text is never seen in calibration.
The selection is fixed, so the same Python gives the same corpus.

:func:`domain_pairs` gives calibration and evaluation texts of different kinds (docstrings only against
source, source against docstrings, one package against another), to measure how well ranges fitted
to one kind of text hold on another.
"""

import ast
import json
import sysconfig
from pathlib import Path

CALIBRATION_MODULES = (
    "argparse",
    "collections/__init__",
    "csv",
    "dataclasses",
    "datetime",
    "email/message",
    "fractions",
    "functools",
    "heapq",
    "json/decoder",
    "logging/__init__",
    "pathlib",
    "shutil",
    "string",
    "textwrap",
    "threading",
    "typing",
    "zipfile",
)
EVAL_PROSE_MODULES = (
    "asyncio/events",
    "calendar",
    "configparser",
    "decimal",
    "difflib",
    "inspect",
    "pydoc",
    "statistics",
    "subprocess",
    "tarfile",
    "unittest/case",
    "urllib/parse",
)
EVAL_CODE_MODULES = (
    "ast",
    "bisect",
    "enum",
    "glob",
    "ipaddress",
    "locale",
    "pprint",
    "queue",
    "random",
    "tokenize",
    "traceback",
    "uuid",
)


PACKAGE_PAIR = ("email", "asyncio")  # calibrate on one package's modules, evaluate on another's
LICENSE = "LICENSE.txt"  # English legal prose, about 3,800 tokens: a small calibration text of one kind
NOTES = ("idlelib/NEWS.txt", "idlelib/NEWS2x.txt", "idlelib/HISTORY.txt", "idlelib/README.txt", "idlelib/TODO.txt")


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source(module: str) -> str:
    return (_stdlib() / f"{module}.py").read_text(encoding="utf-8")


def package_sources(package: str) -> list[str]:
    """The source of every module of a standard-library package, in path order."""
    root = _stdlib() / package
    return [
        f.read_text(encoding="utf-8") for f in sorted(root.rglob("*.py")) if "test" not in f.relative_to(root).parts
    ]


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


def eval_sources() -> list[str]:
    """The sources of the evaluation modules, prose modules first, each a whole real document (long-context check)."""
    return [_source(m) for m in EVAL_PROSE_MODULES + EVAL_CODE_MODULES]


def domain_pairs() -> dict[str, tuple[list[str], str]]:
    """``name -> (calibration samples, evaluation text)``, each pair's two sides of different kinds and modules.

    ``mixed->docstrings`` and ``mixed->source`` are the standard split (:func:`calibration_samples`,
    :func:`eval_prose`, :func:`eval_code`); ``docstrings->source`` calibrates on the calibration modules'
    docstrings alone, ``source->docstrings`` on their sources alone; ``email->asyncio`` calibrates on one
    package's sources and evaluates on another's; ``license->source`` calibrates on a few thousand tokens of
    legal English (Python's licence) and ``notes->source`` on IDLE's release notes, English prose with no code.
    """
    calib_docs = ["\n\n".join(docstrings(m)) for m in CALIBRATION_MODULES]
    calib_code = [_source(m) for m in CALIBRATION_MODULES]
    pkg_calib, pkg_eval = PACKAGE_PAIR
    return {
        "mixed->docstrings": (calibration_samples(), eval_prose()),
        "mixed->source": (calibration_samples(), eval_code()),
        "docstrings->source": (calib_docs, eval_code()),
        "source->docstrings": (calib_code, eval_prose()),
        f"{pkg_calib}->{pkg_eval}": (package_sources(pkg_calib), "\n\n".join(package_sources(pkg_eval))),
        "license->source": ([(_stdlib() / LICENSE).read_text(encoding="utf-8")], eval_code()),
        "notes->source": ([(_stdlib() / f).read_text(encoding="utf-8") for f in NOTES], eval_code()),
    }


def write(directory: Path) -> dict[str, Path]:
    """Write ``calib.jsonl``, ``eval_prose.txt`` and ``eval_code.txt`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "calib": directory / "calib.jsonl",
        "prose": directory / "eval_prose.txt",
        "code": directory / "eval_code.txt",
    }
    with paths["calib"].open("w", encoding="utf-8") as f:
        for sample in calibration_samples():
            f.write(json.dumps({"text": sample}) + "\n")
    paths["prose"].write_text(eval_prose(), encoding="utf-8")
    paths["code"].write_text(eval_code(), encoding="utf-8")
    return paths
