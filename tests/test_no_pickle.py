"""No pickle anywhere in engine/ and fedtui/: unpickling a crafted file runs arbitrary code.

Every ``.py`` file is scanned for ``weights_only=False``, ``allow_pickle=True``, imports of pickle
and its relatives, ``pickle.load``/``loads``/``Unpickler`` and ``torch.load(`` without a literal
``weights_only=True``. A failure names the file and line of each finding.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("engine", "fedtui")

# Modules whose load functions unpickle (shelve and joblib use pickle underneath).
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "joblib"}
UNPICKLE_CALLS = {"load", "loads", "Unpickler"}
TEXT_PATTERNS = {
    re.compile(r"weights_only\s*=\s*False"): "weights_only=False",
    re.compile(r"allow_pickle\s*=\s*True"): "allow_pickle=True",
}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _keyword_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def pickle_uses(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, what) for every pickle use in ``source``."""
    found = []
    for number, line in enumerate(source.splitlines(), 1):
        for pattern, what in TEXT_PATTERNS.items():
            if pattern.search(line):
                found.append((number, what))
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in PICKLE_MODULES:
                found.append((node.lineno, f"from {module} import ..."))
            elif module in ("torch", "torch.serialization") and any(a.name == "load" for a in node.names):
                found.append((node.lineno, f"from {module} import load (use torch.load(..., weights_only=True))"))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func) or ""
            head, _, last = name.rpartition(".")
            if head.split(".")[0] in PICKLE_MODULES and last in UNPICKLE_CALLS:
                found.append((node.lineno, f"{name}("))
            elif name in ("torch.load", "torch.serialization.load") and not _keyword_is(node, "weights_only", True):
                found.append((node.lineno, f"{name}( without weights_only=True"))
            elif name in ("np.load", "numpy.load") and any(k.arg == "allow_pickle" for k in node.keywords):
                if not _keyword_is(node, "allow_pickle", False):
                    found.append((node.lineno, f"{name}( with allow_pickle not literally False"))
    return sorted(set(found))


def test_the_scanner_finds_each_kind_of_pickle_use():
    source = "\n".join(
        [
            "import pickle",  # 1
            "from dill import loads",  # 2
            "x = pickle.load(f)",  # 3
            "y = torch.load(path)",  # 4
            "z = torch.load(path, map_location='cpu',",  # 5
            "               weights_only=False)",  # 6
            "w = np.load(path, allow_pickle=True)",  # 7
            "ok = torch.load(path, weights_only=True)",  # 8
            "ok = np.load(path, allow_pickle=False)",  # 9
            "ok = np.load(path)",  # 10
            "from torch import load",  # 11
        ]
    )
    lines = {line for line, _ in pickle_uses(source)}
    assert lines == {1, 2, 3, 4, 5, 6, 7, 11}


def test_no_pickle_in_engine_or_fedtui():
    findings = []
    files = [path for folder in SCANNED for path in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 10, "the scan found too few files to be looking in the right place"
    for path in files:
        for line, what in pickle_uses(path.read_text(encoding="utf-8"), str(path)):
            findings.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not findings, "pickle can run arbitrary code when loading; found:\n" + "\n".join(findings)
