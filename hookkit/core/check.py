"""Argument checks shared by the public functions: each raises ``ArgumentTypeError`` (a ``TypeError``) or
``ArgumentError`` (a ``ValueError``) naming the function, the parameter, the value given and what is accepted.

Public functions call these at their top, before they register a hook, create a folder or run the model, so a
mistake changes nothing. Checks that need more than a type or a range (a layer spec, ``to=``, ``pool=``) stay with
the code that understands the value and raise the same classes.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable
from typing import Any

from hookkit._errors import ArgumentError, ArgumentTypeError

__all__ = ["flag", "whole", "choice", "path", "function", "instance", "shown"]


def shown(value: Any) -> str:
    """``value`` for a message: its type and a repr cut to one short line."""
    text = " ".join(repr(value).split())
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"


def flag(where: str, **values: Any) -> None:
    """Each keyword is a ``bool`` (not ``1``, ``"yes"`` or ``None``, which would read as a different wish)."""
    for param, value in values.items():
        if not isinstance(value, bool):
            raise ArgumentTypeError(f"{where}: {param}= takes True or False, got {shown(value)}.")


def whole(where: str, param: str, value: Any, *, minimum: int | None = None, none: bool = False,
          meaning: str = "") -> None:
    """``value`` is an integer (an ``int``, a numpy integer; not a ``bool``) of at least ``minimum``, or ``None``
    where ``none``."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        accepted = "an int" + (" or None" if none else "")
        raise ArgumentTypeError(f"{where}: {param}= takes {accepted}{meaning}, got {shown(value)}.")
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{where}: {param}={value} is out of range: {param} must be a whole number >= "
                            f"{minimum}{meaning}.")


def choice(where: str, param: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` is one of ``choices`` (compared with ``==`` only for values of the same type)."""
    options = list(choices)
    if not any(type(value) is type(c) and value == c for c in options):
        shown_options = [repr(c) for c in options]
        listed = " or ".join([", ".join(shown_options[:-1]), shown_options[-1]] if len(options) > 1 else shown_options)
        raise ArgumentError(f"{where}: {param}={value!r} is not one of the choices: use {listed}.")


def path(where: str, param: str, value: Any, *, none: bool = False) -> None:
    """``value`` is a ``str`` or ``os.PathLike`` naming a path (or ``None`` where ``none``)."""
    if value is None and none:
        return
    if not isinstance(value, (str, os.PathLike)):
        accepted = "a str or pathlib.Path" + (" or None" if none else "")
        raise ArgumentTypeError(f"{where}: {param}= takes {accepted}, got {shown(value)}.")
    if isinstance(value, str) and not value:
        raise ArgumentError(f"{where}: {param}='' names no file or folder; give a path.")


def function(where: str, param: str, value: Any, *, none: bool = False, meaning: str = "") -> None:
    """``value`` is callable (or ``None`` where ``none``)."""
    if value is None and none:
        return
    if not callable(value):
        accepted = "a function" + (" or None" if none else "")
        raise ArgumentTypeError(f"{where}: {param}= takes {accepted}{meaning}, got {shown(value)}.")


def instance(where: str, param: str, value: Any, types: type | tuple[type, ...], accepted: str) -> None:
    """``value`` is an instance of ``types``, described to the user as ``accepted``."""
    if not isinstance(value, types):
        raise ArgumentTypeError(f"{where}: {param}= takes {accepted}, got {shown(value)}.")

