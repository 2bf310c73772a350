"""The house rules of the README's "Layout" section, checked on the source: each floor imports
only from the floors below it (models never from parallel), and no function is over 80 lines."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "twolevel_dist"

FLOORS = {
    "errors": 0, "validate": 0, "paper": 0, "eager": 0, "progress": 0,
    "layers": 1, "data": 1,
    "models": 2, "parallel": 2,
    "engine": 3, "params": 3, "selfgroup": 3,
    "config": 4, "train": 4, "compress": 4, "demo": 4, "evaluate": 4, "torchrun": 4,
}
# Imports within one floor that the layout allows (everything else on one floor stays apart).
SAME_FLOOR = {("validate", "errors"), ("train", "config"), ("compress", "config"),
              ("evaluate", "config"), ("evaluate", "train")}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if parts != ("__init__.py",):
            yield parts[0].removesuffix(".py"), path, ast.parse(path.read_text())


def _imported_units(tree):
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            if name.startswith("twolevel_dist."):
                yield name.split(".")[1]


def test_every_module_has_a_floor_and_imports_only_from_below():
    wrong = []
    for unit, path, tree in _modules():
        assert unit in FLOORS, f"{path}: give {unit!r} a floor in FLOORS and the README's Layout"
        for other in set(_imported_units(tree)) - {unit}:
            below = FLOORS[other] < FLOORS[unit] or (unit, other) in SAME_FLOOR
            if not below:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports twolevel_dist.{other}")
    assert not wrong, "imports against the layout:\n" + "\n".join(wrong)


def test_the_rule_sees_a_forbidden_import():
    tree = ast.parse("def f():\n    from twolevel_dist.parallel import parallelize\n")
    assert list(_imported_units(tree)) == ["parallel"]
    assert FLOORS["parallel"] >= FLOORS["models"] and ("models", "parallel") not in SAME_FLOOR


def test_no_function_is_over_80_lines():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} "
            f"({node.end_lineno - node.lineno + 1} lines)"
            for _, path, tree in _modules() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 80]
    assert not long, "split these into named steps:\n" + "\n".join(long)
