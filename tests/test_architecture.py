"""Layers point one way (docs/architecture.md): runtime at the bottom, the CLI on top, no cycles.

Every import statement of the project's source is read (module level and inside functions), so a
lazy import counts as much as a top-level one.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folder -> its layer; a folder may import its own layer and the ones below it.
LAYERS = {"runtime": 0, "serving": 1, "convert": 2, "training": 3, "export": 4, "servers": 5, "bench": 6, "zooter": 7}
PACKAGE = {"runtime": "zooter.runtime", "serving": "zooter.serving", "convert": "zooter.convert",
           "training": "zooter.training", "export": "zooter.export", "servers": "zooter.servers",
           "bench": "zooter.bench", "triton_models": "zooter.triton_models"}
RUNTIME_THIRD_PARTY = {"numpy", "onnxruntime", "tokenizers"}


def imports(folder: str) -> list[tuple[Path, int, str]]:
    """(file, line, imported module) for every import in a source folder."""
    out = []
    for path in sorted((REPO / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(path, node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:   # relative imports: resolve against the folder's package
                    out.append((path, node.lineno, f"{PACKAGE.get(folder, 'zooter')}.{node.module or ''}"))
                else:
                    out.append((path, node.lineno, node.module))
    return out


def layer_of(module: str) -> str | None:
    """The folder a zooter module lives in (zooter.cli and zooter itself: 'zooter')."""
    parts = module.split(".")
    if parts[0] != "zooter":
        return None
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    if len(parts) > 1 and parts[1] == "triton_models":
        return "triton_models"
    return "zooter"


def test_runtime_needs_nothing_else_of_ours():
    allowed = RUNTIME_THIRD_PARTY | set(sys.stdlib_module_names)
    bad = [f"{path.relative_to(REPO)}:{line}: {module}" for path, line, module in imports("runtime")
           if not (module.split(".")[0] in allowed or module == "zooter.runtime" or module.startswith("zooter.runtime."))]
    assert not bad, "runtime/ imports more than numpy, onnxruntime, tokenizers, the standard library and itself:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", list(LAYERS))
def test_folders_import_only_their_own_layer_and_below(folder):
    bad = []
    for path, line, module in imports(folder):
        target = layer_of(module)
        if target is None:
            continue
        if target == "triton_models":
            if folder != "export":   # only the repository builder needs the templates' helpers
                bad.append(f"{path.relative_to(REPO)}:{line}: {module}")
        elif LAYERS[target] > LAYERS[folder]:
            bad.append(f"{path.relative_to(REPO)}:{line}: {module} ({folder} must not import {target})")
    assert not bad, "an import points up the layers:\n" + "\n".join(bad)


def test_triton_models_use_the_runtime_only():
    bad = [f"{path.relative_to(REPO)}:{line}: {module}" for path, line, module in imports("triton_models")
           if layer_of(module) not in (None, "runtime", "triton_models")]
    assert not bad, "\n".join(bad)


def test_one_inference_session_construction():
    """Every consumer opens the model through zooter.runtime.session.open_session."""
    found = [f"{path.relative_to(REPO)}:{n}" for folder in (*LAYERS, "triton_models")
             for path in sorted((REPO / folder).rglob("*.py"))
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
             if "InferenceSession(" in line]
    assert found == ["runtime/session.py:" + found[0].split(":")[1]] and len(found) == 1, found


def test_no_argparse_below_the_cli():
    bad = [f"{path.relative_to(REPO)}:{line}" for folder in LAYERS if folder != "zooter"
           for path, line, module in imports(folder) if module == "argparse"]
    assert not bad, bad
