"""The package's shape, pinned: recipes are short scripts over train/, and arrows point down (nothing below
`kdcache/recipes/`, nor a recipe beside the one it would borrow from, imports a recipe)."""

from __future__ import annotations

import ast
from pathlib import Path

import kdcache

PACKAGE = Path(kdcache.__file__).parent
#: The most lines the distill recipe may hold, its docstring included: the run's lifecycle lives in train/.
DISTILL_MAX_LINES = 250


def _recipe_imports(path: Path, root: Path = PACKAGE.parent, above: str = "kdcache.recipes") -> list[str]:
    """Every import of `above` (kdcache.recipes) in a module (at any depth: a deferred import inside a function
    counts)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [f"{path.relative_to(root)}:{node.lineno}" for name in names
                  if name == above or name.startswith(f"{above}.")][:1]
    return found


def test_the_distill_recipe_stays_a_short_script():
    lines = len((PACKAGE / "recipes" / "distill.py").read_text().splitlines())
    assert lines <= DISTILL_MAX_LINES, f"kdcache/recipes/distill.py has {lines} lines (at most {DISTILL_MAX_LINES})"


def test_sweep_and_the_layers_below_the_recipes_import_no_recipe():
    below = [p for d in ("train", "methods", "cache", "models", "data") for p in sorted((PACKAGE / d).rglob("*.py"))]
    leaves = sorted(p for p in PACKAGE.glob("*.py"))
    modules = [PACKAGE / "recipes" / "sweep.py", *below, *leaves]
    assert any(p.parent.name == "train" and p.name == "run.py" for p in modules)
    assert [hit for p in modules for hit in _recipe_imports(p)] == []


def test_the_import_finder_sees_every_form_of_a_recipe_import(tmp_path):
    """The check above can fail: each way of importing a recipe is found, an unrelated import is not."""
    module = tmp_path / "probe.py"
    module.write_text("import kdcache.recipes.distill\nfrom kdcache.recipes.distill import distill\n"
                      "from kdcache import recipes\nfrom kdcache.train import run\n"
                      "def later():\n    from kdcache.recipes import sweep\n")
    assert _recipe_imports(module, tmp_path) == ["probe.py:1", "probe.py:2", "probe.py:3", "probe.py:6"]


def test_methods_and_the_layers_below_them_import_nothing_from_train():
    """methods/ sits below train/: a method reads its presets from kdcache/presets.py, not from train/config.py."""
    modules = [p for d in ("methods", "cache", "models", "data") for p in sorted((PACKAGE / d).rglob("*.py"))]
    assert [hit for p in modules for hit in _recipe_imports(p, above="kdcache.train")] == []
