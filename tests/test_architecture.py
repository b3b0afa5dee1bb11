"""The data flow of ARCHITECTURE.md, checked on the source: every module imports only from the
packages its box may read. spec -> execute -> train -> store -> analysis -> report: nothing that
runs or records training imports analysis or report, and analysis never imports what trains.
The driver (rounds of runs judged between them) is the one place execute and analysis meet."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lmlab"
BASE = {"lmlab", "names", "errors", "config", "identity"}  # the vocabulary every box shares

# box -> the boxes it may import from (besides BASE and itself)
ALLOWED: dict[str, set[str]] = {
    "spec": set(),
    "data": set(),
    "model": set(),
    "optim": set(),
    "store": set(),
    "train": {"data", "model", "optim", "store"},
    "execute": {"spec", "data", "model", "train", "store"},
    "analysis": {"spec", "store"},
    "report": {"spec", "store", "analysis"},
    "export": {"store", "analysis"},
    "serve": {"store", "analysis", "report"},
    # The lab notebook reads experiments as their reports judge them (decision, verdict,
    # Phase-1) and writes baselines in the spec's own format (spec.baseline), so a decision
    # adopted is read back by the same code that validates a spec extending it.
    "notebook": {"spec", "store", "analysis", "report"},
    # Runs an experiment's rounds (and later tuning phases) through execute, judging with
    # analysis between them: the one box that may join the two, since execute must never read
    # analysis. Only the command line drives it.
    "driver": {"spec", "store", "execute", "analysis"},
    "cli": {"spec", "data", "model", "optim", "store", "train", "execute", "analysis", "report",
            "export", "serve", "driver", "notebook"},
}


def _box(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lmlab"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lmlab")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmlab"):
            out.add(node.module)
    return out


def test_every_import_follows_the_data_flow() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        module = "lmlab." + ".".join(path.relative_to(SRC).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        box = _box(module)
        if box in BASE:
            allowed = BASE
        else:
            assert box in ALLOWED, f"{module}: unknown box {box!r}; add it to ALLOWED"
            allowed = BASE | ALLOWED[box] | {box}
        for imported in _imports(path):
            if _box(imported) not in allowed:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_only_the_command_line_drives_experiments() -> None:
    users = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                   if any(_box(m) == "driver" for m in _imports(p)))
    assert users and all(u.startswith("cli/") for u in users), users


def test_no_module_is_too_long_to_read_in_one_sitting() -> None:
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 520}
    assert not long, long
