"""The package's layers (DESIGN.md section 3), read from the modules' imports with ``ast``.

Each module imports only modules of its own layer or of earlier ones, so the torch core
never reaches the estimators, the evaluation or the front. An import inside a function
(a lazy import) hides a dependency; each one needs a reason in ``LAZY_IMPORTS``.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sk_padim"

# Earliest layer first. "base": helpers that import no other layer, for any layer to use
# (``_checks`` validates labels and masks for the detector's ``fit(X, y)`` as well as
# for the evaluation).
LAYERS = {
    "base": {"_checks", "_version", "conformal", "files", "versioning"},
    "core": {
        "backbones",
        "devices",
        "runtimes",
        "embedding",
        "feature_checks",
        "images",
        "mahalanobis",
        "model",
        "packing",
        "postprocess",
        "pruning",
        "statistics",
        "store",
        "texture",
        "tiling",
        "whitening",
    },
    "estimators": {"detector", "feature_cache", "features", "pipelines"},
    "evaluation": {"calibration", "evaluation", "metrics", "model_selection", "regions"},
    "front": {
        "cli",
        "dask",
        "datasets",
        "demo",
        "export",
        "persistence",
        "plotting",
        "streaming",
    },
}
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}
RANK = {layer: rank for rank, layer in enumerate(LAYERS)}

# (importer, imported) -> why the import sits inside a function.
_CLI_LAZY = (
    "sk-padim --help and usage errors answer without importing torch and scikit-learn "
    "(issue 23, item 11): the command imports the library inside the commands"
)
LAZY_IMPORTS = {
    **{
        ("cli", module): _CLI_LAZY
        for module in (
            "calibration",
            "conformal",
            "datasets",
            "demo",
            "evaluation",
            "export",
            "files",
            "persistence",
            "plotting",
            "regions",
            "streaming",
        )
    },
    ("evaluation", "datasets"): "Category.from_mvtec, a deprecated alias of the front's "
    "datasets.load_mvtec_category; goes with the alias",
    ("evaluation", "plotting"): "evaluate(n_heatmaps=...), a deprecated parameter drawing "
    "with the front's plotting.heatmap_writer; goes with the parameter",
}


def modules() -> list[str]:
    return sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")


def imported_modules(name: str) -> list[tuple[str, bool]]:
    """``(module, lazy)`` for each sk_padim module that module ``name`` imports."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text(), filename=f"{name}.py")
    found = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((module, inner) for module in _targets(child))
            visit(child, inner)

    visit(tree, False)
    return found


def _targets(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The sk_padim modules an import statement names (``""`` for the package itself)."""
    if isinstance(node, ast.Import):
        dotted = [alias.name for alias in node.names]
    elif node.level:  # relative: from . import x, from .x import y
        base = "sk_padim" + (f".{node.module}" if node.module else "")
        dotted = [base] if node.module else [f"{base}.{alias.name}" for alias in node.names]
    elif node.module == "sk_padim":
        dotted = [f"sk_padim.{alias.name}" for alias in node.names]
    else:
        dotted = [node.module or ""]
    targets = []
    for path in dotted:
        parts = path.split(".")
        if parts[0] == "sk_padim":
            module = parts[1] if len(parts) > 1 else ""
            targets.append(module if (PACKAGE / f"{module}.py").exists() else "")
    return targets


def test_every_module_has_one_layer():
    assert set(modules()) - set(LAYER_OF) == set(), "add the new modules to LAYERS"
    assert set(LAYER_OF) - set(modules()) == set(), "remove the deleted modules from LAYERS"


@pytest.mark.parametrize("name", modules())
def test_modules_import_only_their_own_and_earlier_layers(name):
    assert name in LAYER_OF, f"add {name} to LAYERS"
    late = []
    for module, lazy in imported_modules(name):
        if module == "":
            late.append("the package sk_padim (import from the defining module)")
        elif _later(module, name) and (name, module) not in LAZY_IMPORTS:
            late.append(f"{module} ({LAYER_OF[module]}{', lazily' if lazy else ''})")
    assert late == [], f"{name} ({LAYER_OF[name]}) imports a later layer: {late}"


def _later(module: str, than: str) -> bool:
    return RANK[LAYER_OF.get(module, "front")] > RANK[LAYER_OF[than]]


def test_lazy_imports_are_exactly_the_documented_ones():
    lazy = {
        (name, module) for name in modules() for module, inner in imported_modules(name) if inner
    }
    assert lazy == set(LAZY_IMPORTS)


def test_front_and_core_are_apart_in_both_directions():
    """The two breaches of issue 21: images read folders, evaluation drew pictures."""
    assert "datasets" not in {module for module, _ in imported_modules("images")}
    assert "images" in {module for module, _ in imported_modules("datasets")}
    eager = {module for module, lazy in imported_modules("evaluation") if not lazy}
    assert eager.isdisjoint({"plotting", "datasets"})


def test_the_torch_core_imports_no_scikit_learn():
    users = []
    for name in sorted(LAYERS["core"]):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            if "sklearn" in roots:
                users.append(name)
    assert users == []
