"""docs/MODELS.md's "What works, per family" table: every cell says yes or refused, and each test
it cites exists in the file it names (defined there, or imported into it to run there)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITE = re.compile(r"`(test_[\w]+\.py)::(test_\w+)`")


def _table() -> list[tuple[str, list[str]]]:
    text = (ROOT / "docs" / "MODELS.md").read_text()
    start = text.index("| family / kind |")
    lines = text[start:text.index("\n\n", start)].splitlines()[2:]
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows.append((cells[0], cells[1:]))
    return rows


def _names(path: Path) -> set[str]:
    """Test functions a module defines or imports (pytest collects both)."""
    tree = ast.parse(path.read_text())
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    return names


def test_every_cell_is_yes_or_refused_and_cites_an_existing_test():
    rows = _table()
    header = (ROOT / "docs" / "MODELS.md").read_text().split("| family / kind |")[1].splitlines()[0]
    columns = len([c for c in header.split("|") if c.strip()])
    assert len(rows) >= 20
    for kind, cells in rows:
        assert len(cells) == columns, (kind, len(cells))
        for cell in cells:
            assert cell.startswith(("yes: ", "refused: ")), (kind, cell)
            cites = CITE.findall(cell)
            assert cites, (kind, cell)
            for file, name in cites:
                path = ROOT / "tests" / "integration" / file
                assert path.is_file(), (kind, file)
                assert name in _names(path), (kind, f"{file}::{name}")


def test_the_check_sees_a_missing_test():
    assert "test_no_such_thing" not in _names(ROOT / "tests" / "integration" / "test_dpo.py")
    assert "test_dpo_step_equals_the_pixel_path" in _names(ROOT / "tests" / "integration" / "test_dpo.py")
