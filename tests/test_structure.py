"""The package's shape: each public name means one thing, and every exception lives in one module and reports
``hookkit`` as its module (issue 9)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import hookkit
import hookkit._errors as errors


def test_no_submodule_is_hidden_by_a_function_of_the_same_name():
    for info in pkgutil.iter_modules(hookkit.__path__):
        public = getattr(hookkit, info.name, None)
        module = importlib.import_module(f"hookkit.{info.name}")
        if public is not None:
            assert public is module, f"hookkit.{info.name} is {public!r}, hiding the module of that name"


def test_every_exception_class_is_defined_in_errors_and_reports_hookkit():
    found = {}
    for info in pkgutil.walk_packages(hookkit.__path__, prefix="hookkit."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, hookkit.HookkitError):
                found[name] = obj
    assert found, "no hookkit errors found"
    for name, cls in found.items():
        assert cls.__module__ == "hookkit", name
        assert getattr(hookkit, cls.__name__) is cls and cls.__name__ in hookkit.__all__, name
        assert vars(errors).get(cls.__name__) is cls, f"{name} is not defined in hookkit/_errors.py"


def test_every_hook_is_registered_in_core_handles():
    """One place registers hooks: a ``register_*hook`` call anywhere else in the package fails this test (docstrings
    and comments that name torch's functions are not calls)."""
    import ast
    from pathlib import Path

    package = Path(hookkit.__file__).parent
    home = package / "core" / "handles.py"
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr.startswith("register_") and node.func.attr.endswith("hook")):
                found.append((path, node.lineno, node.func.attr))
    assert {p for p, _, _ in found} == {home}, [(str(p.relative_to(package)), n, a) for p, n, a in found if p != home]
