"""The layout DESIGN.md promises, checked on the source: thin stages over libraries."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "musubi_pipe"


def _imports(path: Path) -> set[str]:
    """Every module a file imports (at any depth, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_stage_imports_another_stage_and_config_imports_none():
    from musubi_pipe.stages import STAGE_NAMES, all_stages

    assert [stage.name for stage in all_stages()] == list(STAGE_NAMES)
    stage_modules = {f"musubi_pipe.stages.{name}" for name in STAGE_NAMES}
    for path in (PACKAGE / "stages").glob("*.py"):
        if path.name == "__init__.py":
            continue
        own = f"musubi_pipe.stages.{path.stem}"
        assert not (_imports(path) & (stage_modules - {own})), f"{path.name} imports another stage"
    for path in list((PACKAGE / "config").glob("*.py")) + list((PACKAGE / "sampling").glob("*.py")):
        reached = {name for name in _imports(path) if name.startswith("musubi_pipe.stages")}
        assert not reached, f"{path.relative_to(PACKAGE)} imports {sorted(reached)}"
