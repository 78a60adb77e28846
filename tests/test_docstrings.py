"""Every public class that takes constructor arguments documents them (timm/diffusers style).

A public class (name not starting with ``_``) whose ``__init__`` takes more than
``self``, or that is a ``@dataclass``, needs an ``Args:`` or ``Attributes:``
section in its docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mmtts"


def _is_dataclass(cls: ast.ClassDef) -> bool:
    for dec in cls.decorator_list:
        node = dec.func if isinstance(dec, ast.Call) else dec
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
        if name == "dataclass":
            return True
    return False


def _init_takes_arguments(cls: ast.ClassDef) -> bool:
    for item in cls.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == "__init__":
            a = item.args
            named = a.posonlyargs + a.args + a.kwonlyargs
            return len(named) > 1 or a.vararg is not None or a.kwarg is not None
    return False


def _offenders() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            if not (_is_dataclass(node) or _init_takes_arguments(node)):
                continue
            doc = ast.get_docstring(node) or ""
            if "Args:" not in doc and "Attributes:" not in doc:
                out.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    return out


def test_package_is_found():
    assert any(PACKAGE.rglob("*.py")), f"no modules under {PACKAGE}"


def test_public_classes_document_their_arguments():
    offenders = _offenders()
    assert not offenders, ("public classes with constructor arguments or dataclass fields but no 'Args:' or "
                           "'Attributes:' section in their docstring:\n  " + "\n  ".join(offenders))
