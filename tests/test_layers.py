"""Dependencies point down (issue 20, item 4): the package's layers import only the layers below them.

A run flows config -> data + model -> method -> checkpoint -> adaptation -> evaluation; nothing
downstream is imported upstream. Every module under ``robustexp/`` is parsed (no import is
executed), and every import statement counts, at any level: module top, ``if TYPE_CHECKING``
blocks and imports inside functions alike (a function-local import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "robustexp"

# importer layer -> the layers it must not import
FORBIDDEN = {
    "data": ("evaluation", "methods", "training"),
    "models": ("evaluation", "methods", "training"),
    "evaluation": ("methods",),
    "adaptation": ("evaluation", "methods"),
}

# Known exceptions, each to be removed when its move lands: (importing module, imported module).
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file; relative imports are resolved,
    and ``from robustexp import evaluation`` counts as importing ``robustexp.evaluation``."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if layer_of(target) is None:  # ``from robustexp import methods``: the names are the modules
                found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((target, node.lineno))
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "robustexp" else None


def violations(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        forbidden = FORBIDDEN.get(layer_of(importer), ())
        for target, line in imported_modules(path, root):
            if layer_of(target) in forbidden and (importer, target) not in KNOWN_EXCEPTIONS:
                found.append(f"{path.relative_to(root.parent)}:{line} ({layer_of(importer)}/) imports {target} "
                             f"({layer_of(target)}/)")
    return sorted(set(found))


def test_dependencies_point_down():
    found = violations()
    assert not found, ("imports against the layer order (data/ and models/ import none of evaluation/, methods/, "
                       "training/; evaluation/ not methods/; adaptation/ neither evaluation/ nor methods/); move "
                       "the shared code down (to data/, models/, robustexp/losses.py):\n" + "\n".join(found))


def test_known_exceptions_are_still_needed():
    """An exception whose import is gone must be deleted from the list (it would hide a regression)."""
    present = {(module_name(p), t) for p in PACKAGE.rglob("*.py") for t, _ in imported_modules(p)}
    assert not KNOWN_EXCEPTIONS - present


@pytest.mark.parametrize("source, expected", [
    ("from robustexp.evaluation.base import test_batches", ["robustexp.evaluation.base"]),
    ("def f():\n    from robustexp.methods.ant import NoiseGenerator\n", ["robustexp.methods.ant"]),
    ("import robustexp.training.trainer as t", ["robustexp.training.trainer"]),
    ("from robustexp import methods", ["robustexp.methods"]),
    ("from ...methods.advbn import split_network", ["robustexp.methods.advbn"]),
    ("from ...evaluation import report", ["robustexp.evaluation"]),
    ("from ... import methods, utils", ["robustexp.methods"]),
    ("from ..base import DataSplits", []),  # robustexp.data.base: the same layer
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from robustexp.evaluation import base\n",
     ["robustexp.evaluation"]),
    ("from robustexp.data.base import DataSplits\nimport torch", []),
])
def test_the_check_sees_every_kind_of_import(tmp_path, source, expected):
    """The parser catches absolute, relative, ``from package import module`` and function-local
    imports of a forbidden layer (here in a fake ``robustexp/data/corruptions/x.py``)."""
    root = tmp_path / "robustexp"
    (root / "data" / "corruptions").mkdir(parents=True)
    (root / "data" / "corruptions" / "x.py").write_text(source)
    found = violations(root)
    assert [line.split(" imports ")[1].split(" (")[0] for line in found] == expected


# ------------------------------------------------------------------ explicit registries (issue 20, item 5)
def test_corruption_table_lists_every_corruption_with_its_functions():
    """The engine's table is written out (no ``globals()`` lookup): every corruption of
    ALL_CORRUPTIONS has its ``_apply_<name>`` and, for a random one, its ``_draw_<name>``."""
    from robustexp.data.corruptions import engine
    from robustexp.data.corruptions.names import ALL_CORRUPTIONS

    assert set(engine.CORRUPTIONS) == set(ALL_CORRUPTIONS) and len(engine.CORRUPTIONS) == 19
    for name, corruption in engine.CORRUPTIONS.items():
        assert corruption.apply is getattr(engine, f"_apply_{name}")
        assert corruption.draw is getattr(engine, f"_draw_{name}", None)
    assert "globals()" not in Path(engine.__file__).read_text()


def test_corruption_table_check_fails_on_a_missing_or_unknown_entry():
    from robustexp.data.corruptions import engine

    table = dict(engine.CORRUPTIONS)
    engine.check_registry(table)
    del table["fog"]
    with pytest.raises(RuntimeError, match=r"engine.py: CORRUPTIONS has no entry for \['fog'\]"):
        engine.check_registry(table)
    with pytest.raises(RuntimeError, match=r"unknown corruptions \['haze'\]"):
        engine.check_registry({**engine.CORRUPTIONS, "haze": engine.CORRUPTIONS["fog"]})


# ------------------------------------------------------------------ one copy of each building block (issue 20, item 5)
def test_mnist_c_uses_the_imagenet_c_plasma_fractal_and_gaussian_blur():
    """MNIST-C's fog, glass blur, spatter and Canny smoothing run the ImageNet-C engine's code, not
    copies of it."""
    import inspect

    from robustexp.data.corruptions import engine, mnist_c

    assert mnist_c.plasma_fractal is engine.plasma_fractal
    source = inspect.getsource(mnist_c)
    assert "def plasma_fractal" not in source and "def gaussian_blur" not in source
    assert "_ops.gaussian_filter(" in inspect.getsource(mnist_c._glass_blur)
    assert "_ops.gaussian_filter(" in inspect.getsource(mnist_c._spatter)
    assert "_ops.gaussian_filter(" in inspect.getsource(mnist_c.canny)


@pytest.mark.parametrize("sigma, mode", [((1.0, 1.0), "constant"), ((2.5, 1.5), "constant"), ((0.7, 0), "nearest"),
                                         ((0, 3.0), "nearest"), ((1.2, 0.8), "nearest")])
def test_shared_gaussian_filter_matches_scipy_in_the_modes_mnist_c_needs(sigma, mode):
    """``_ops.gaussian_filter`` against ``scipy.ndimage.gaussian_filter`` (float64): zero padding
    (``constant``, MNIST-C's Canny) and an axis with sigma 0 left alone (MNIST-C's row-only glass
    blur), besides skimage's default ``nearest``."""
    np = pytest.importorskip("numpy")
    ndimage = pytest.importorskip("scipy.ndimage")
    import torch

    from robustexp.data.corruptions import _ops

    x = np.random.default_rng(0).random((2, 3, 9, 13))
    expected = ndimage.gaussian_filter(x, (0, 0, *sigma), mode=mode, truncate=4.0)
    got = _ops.gaussian_filter(torch.from_numpy(x), sigma, mode=mode).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
