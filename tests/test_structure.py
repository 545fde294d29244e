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
    for info in pkgutil.iter_modules(hookkit.__path__):
        if info.ispkg:
            continue
        module = importlib.import_module(f"hookkit.{info.name}")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, hookkit.HookkitError):
                found[name] = obj
    assert found, "no hookkit errors found"
    for name, cls in found.items():
        assert cls.__module__ == "hookkit", name
        assert getattr(hookkit, cls.__name__) is cls and cls.__name__ in hookkit.__all__, name
        assert vars(errors).get(cls.__name__) is cls, f"{name} is not defined in hookkit/_errors.py"
