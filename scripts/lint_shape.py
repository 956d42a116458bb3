"""``make lint``'s check of the code's shape, beside ruff, mypy and the import rules.

- No module over 800 lines, no class over 400, no function over 120, in the daemon and the
  client library (tests and the benchmark aside): one concept per module, and parts a reader
  can hold in mind.
- No tracker reference ("issue 17", "(issue 21)") in code or docs: history belongs in commit
  messages; comments and docs explain what is, not how it came to be.

Prints each breach and exits 1 if there is any.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZED = [ROOT / "pgbusd", ROOT / "client" / "pgbus"]
LIMITS = {"module": 800, "class": 400, "function": 120}
#: Where tracker references are looked for.
PROSE = [ROOT / "pgbusd", ROOT / "client", ROOT / "tests", ROOT / "bench", ROOT / "docs"]
TRACKER = re.compile(r"\bissues? \d+\b|\(issue\b", re.IGNORECASE)


def sizes(path: Path) -> list[str]:
    text = path.read_text()
    where = path.relative_to(ROOT)
    found: list[str] = []
    lines = text.count("\n")
    if lines > LIMITS["module"]:
        found.append(f"{where}: module of {lines} lines (at most {LIMITS['module']})")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > LIMITS[kind]:
                found.append(
                    f"{where}:{node.lineno}: {kind} {node.name} of {length} lines "
                    f"(at most {LIMITS[kind]})"
                )
    return found


def tracker_references(path: Path) -> list[str]:
    found = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if TRACKER.search(line):
            found.append(f"{path.relative_to(ROOT)}:{number}: a tracker reference: {line.strip()}")
    return found


def main() -> int:
    breaches: list[str] = []
    for top in SIZED:
        for path in sorted(top.rglob("*.py")):
            breaches += sizes(path)
    for top in PROSE:
        for path in sorted(top.rglob("*")):
            if path.suffix in (".py", ".md", ".rs", ".toml") and "target" not in path.parts:
                breaches += tracker_references(path)
    for readme in ("README.md", "Makefile"):
        breaches += tracker_references(ROOT / readme)
    for breach in breaches:
        print(breach)
    return 1 if breaches else 0


if __name__ == "__main__":
    sys.exit(main())
