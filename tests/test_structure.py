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


# A user's mistake is a hookkit error (``hookkit/_errors.py``: ArgumentError is a ValueError, ArgumentTypeError a
# TypeError...); a plain builtin error is raised only for hookkit's own bugs (a RuntimeError whose message says "bug"
# passes by itself). Each other plain raise must be listed here, keyed (file, function, exception), with its reason.
_PLAIN_ERRORS = {"ValueError", "TypeError", "KeyError", "IndexError", "LookupError", "RuntimeError"}
_PLAIN_RAISES_ALLOWED: dict[tuple[str, str, str], str] = {
    # Raised where a user's mistake arrives, and still plain: to become hookkit errors (then leave this list).
}


def _plain_raises() -> list[tuple[str, str, str, int]]:
    """``(file, function, exception, line)`` of each ``raise ValueError(...)`` (or ``TypeError``, ``KeyError``...)
    in the package, a RuntimeError that says it is a bug excepted."""
    import ast
    from pathlib import Path

    package = Path(hookkit.__file__).parent
    found = []

    class Visitor(ast.NodeVisitor):
        def __init__(self, path: str) -> None:
            self.path, self.scope = path, []

        def _enter(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
            self.scope.append(node.name)
            self.generic_visit(node)
            self.scope.pop()

        visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _enter

        def visit_Raise(self, node: ast.Raise) -> None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in _PLAIN_ERRORS:
                words = " ".join(n.value for n in ast.walk(node.exc)
                                 if isinstance(n, ast.Constant) and isinstance(n.value, str))
                if not (exc.id == "RuntimeError" and "bug" in words):
                    found.append((self.path, ".".join(self.scope) or "<module>", exc.id, node.lineno))
            self.generic_visit(node)

    for path in sorted(package.rglob("*.py")):
        Visitor(path.relative_to(package).as_posix()).visit(ast.parse(path.read_text(), str(path)))
    return found


def test_user_mistakes_raise_hookkit_errors_not_plain_builtin_ones():
    """A new ``raise ValueError(...)`` / ``TypeError`` / ``RuntimeError`` (not saying "bug") anywhere in the package
    fails here: raise the hookkit error that fits (``ArgumentError``, ``ArgumentTypeError``, ``EditError``...)."""
    offenders = [f"{path}:{line} {function}: raise {exc}" for path, function, exc, line in _plain_raises()
                 if (path, function, exc) not in _PLAIN_RAISES_ALLOWED]
    assert not offenders, offenders


def test_the_allow_list_of_plain_raises_names_only_raises_that_exist():
    """An entry whose raise is gone (converted, or moved) leaves the list, so that it cannot let a new one in."""
    present = {(path, function, exc) for path, function, exc, _ in _plain_raises()}
    stale = sorted(set(_PLAIN_RAISES_ALLOWED) - present)
    assert not stale, f"no longer raised, delete from _PLAIN_RAISES_ALLOWED: {stale}"
    assert all(_PLAIN_RAISES_ALLOWED.values()), "every allowed plain raise says why"


def _import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports (at the top or inside a function); ``from
    hookkit.x import y`` counts as importing ``hookkit.x.y`` where ``y`` is a module, else ``hookkit.x``."""
    import ast
    from pathlib import Path

    package = Path(hookkit.__file__).parent
    names = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hookkit"):
                assert node.level == 0, f"{name}: relative import"
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in names else node.module)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("hookkit"))
        edges.discard(name)
    return graph


def test_no_module_imports_the_package_root_and_imports_have_no_cycle():
    graph = _import_graph()
    up = sorted(m for m, edges in graph.items() if "hookkit" in edges and m not in ("hookkit", "hookkit.__main__"))
    assert not up, f"these modules import back up from hookkit itself: {up}"
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for e in sorted(graph.get(m, ())):
            if state.get(e) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(e):], e]))
            if e not in state:
                visit(e, [*path, e])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


_MAX_MODULE_LINES = 520  # "about 500"
_MAX_FUNCTION_LINES = 60  # lines of code: docstring, comments and blank lines not counted


def test_modules_and_functions_stay_small_or_say_why():
    """No module of the package over about 500 lines; no function over 60 lines of code unless a comment on its
    ``def`` line (or the line above) starting ``# long:`` says why."""
    import ast
    from pathlib import Path

    package = Path(hookkit.__file__).parent
    big, long = [], []
    for path in sorted(package.rglob("*.py")):
        lines = path.read_text().splitlines()
        where = str(path.relative_to(package))
        if len(lines) > _MAX_MODULE_LINES:
            big.append((where, len(lines)))
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = node.body
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and len(body) > 1:
                first = body[1]  # after the docstring
            code = [t for t in lines[first.lineno - 1:node.end_lineno] if t.strip() and not t.strip().startswith("#")]
            said = any("# long:" in lines[i] for i in (node.lineno - 2, node.lineno - 1) if i >= 0)
            if len(code) > _MAX_FUNCTION_LINES and not said:
                long.append((f"{where}:{node.lineno} {node.name}", len(code)))
    assert not big, f"modules over {_MAX_MODULE_LINES} lines (split them by concern): {big}"
    assert not long, f"functions over {_MAX_FUNCTION_LINES} lines of code without a '# long:' reason: {long}"
