"""The packages' dependency direction (docs/ARCHITECTURE.md): `backbones` never imports `extract` (the
capture is what a family provides, so it lives in `backbones`), and `cache` imports none of
`extract`, `heads`, `backbones`. Every import statement counts, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def imported_modules(folder: str) -> dict[str, set[str]]:
    """refseg module -> the files of `folder` that import it (anywhere in the file)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                if name.startswith("refseg."):
                    found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("folder, forbidden", [("backbones", ("extract", "heads", "study", "cache")),
                                               ("cache", ("extract", "heads", "study", "backbones"))])
def test_a_package_never_imports_the_layers_above_it(folder, forbidden):
    modules = imported_modules(folder)
    assert any(m.startswith("refseg.core") for m in modules)  # the scan sees imports at all
    wrong = {m: sorted(files) for m, files in modules.items() if m.split(".")[1] in forbidden}
    assert not wrong, wrong
