"""The layers point one way (docs/architecture.md, "Layers"): a module imports only its own layer and those below.

secagg < privacy, config, runs < models, data, metrics, evaluation < fl, centralized < study, integrations, auditing < cli.

The check reads every module's imports (top-level and inside functions) from the source and fails on any upward
one. A second test imports the bottom layers in a fresh interpreter and fails if torch comes with them: the secure
aggregator, the DP math, the ledger audit and the Flower node's privacy are usable without the trainers.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "privfer"
LAYERS = {
    "errors": 0, "secagg": 0,
    "privacy": 1, "config": 1, "runs": 1,
    "models": 2, "data": 2, "metrics": 2, "evaluation": 2,
    "fl": 3, "centralized": 3,
    "study": 4, "integrations": 4, "auditing": 4,
    "cli": 5,
}
KNOWN_UPWARD: set[tuple[str, str]] = set()  # issue 25 emptied it; keep it empty


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("privfer.")}


def upward_imports() -> set[tuple[str, str]]:
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        top = relative.parts[0].removesuffix(".py")
        if top == "__init__":
            continue
        assert top in LAYERS, f"privfer/{relative}: its package {top!r} has no layer in tests/test_layers.py"
        for name in imports(path):
            target = name.split(".")[1]
            assert target in LAYERS, f"privfer/{relative} imports {name}: {target!r} has no layer"
            if LAYERS[target] > LAYERS[top]:
                found.add((relative.as_posix(), name))
    return found


def test_no_module_imports_a_layer_above_its_own():
    found = upward_imports()
    new = sorted(found - KNOWN_UPWARD)
    assert not new, f"upward imports (a lower layer importing a higher one): {new}"
    gone = sorted(KNOWN_UPWARD - found)
    assert not gone, f"these upward imports are gone: remove them from KNOWN_UPWARD in tests/test_layers.py: {gone}"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The scanner itself: a secagg module that imports fl is reported."""
    fake = tmp_path / "privfer"
    (fake / "secagg").mkdir(parents=True)
    (fake / "secagg" / "bad.py").write_text("def f():\n    from privfer.fl.simulation import simulate\n")
    monkeypatch.setattr("test_layers.PACKAGE", fake)
    assert upward_imports() == {("secagg/bad.py", "privfer.fl.simulation")}


BOTTOM = [
    "privfer.secagg", "privfer.config", "privfer.runs", "privfer.privacy.recipe", "privfer.privacy.audit",
    "privfer.privacy.distributed", "privfer.privacy.person", "privfer.privacy.ledger", "privfer.privacy.calibrate",
    "privfer.privacy.one_run", "privfer.privacy.noise", "privfer.privacy.node", "privfer.privacy.node_ledger",
]


def test_the_dp_math_the_ledger_audit_and_the_secure_aggregator_import_without_torch():
    """What the layers are for: a privacy engineer's own FL loop (the recipe), the Flower server's node privacy and
    ``privfer audit`` of a ledger do not pull torch, Opacus or the simulation in."""
    import subprocess
    import sys

    code = ("import sys\n" + "".join(f"import {name}\n" for name in BOTTOM)
            + "heavy = sorted(m for m in ('torch', 'opacus', 'privfer.fl', 'privfer.models') if m in sys.modules)\n"
              "print(','.join(heavy))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing the bottom layers pulled in: {done.stdout.strip()}"
