"""The classes of saved containers (namedtuples, dataclasses, ``ModelOutput`` and other dict, tuple and list
subclasses) and of saved enum members, rebuilt by ``hookkit.load`` without importing a module or running a class's
code because a file says so.

``record.decode``'s decoder asks ``Classes`` for each node that names a class (by module and qualname). A class
is taken only from the classes the caller passed (``load(path, classes=[...])``) or from a module already in
``sys.modules``, looked up in module and class ``__dict__``s (never ``getattr``, which can run a module's
``__getattr__`` or a descriptor); it must be of the kind the file claims (a namedtuple with those fields, a
dataclass with those fields, a subclass of dict / tuple / list) and have no ``__del__``; the instance is made by
the C type it derives from (``tuple.__new__`` as ``namedtuple._make`` does, ``dict.__setitem__``,
``object.__setattr__``...), so no ``__new__``, ``__init__``, ``__post_init__`` or ``__setitem__`` written in Python
runs; an enum member is looked up among its class's members. Any other class gives the plain container (an enum
member, a ``NotSaved`` placeholder), and ``refused`` says why, for ``load``'s warning.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import sys
import types
from collections.abc import Iterable
from typing import Any

__all__ = ["Classes"]

_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement (or type()), not a type built in C
_LOOKUPS = ("__getattribute__", "__getattr__", "__dict__", "__mro__", "__flags__", "__module__", "__qualname__")
# the lookups enum's own metaclass changes (Python 3.11's ``EnumType.__getattr__`` reads the class's members): the
# standard library's code, not a class's; a metaclass derived from it that changes a lookup again is refused
_KNOWN_LOOKUPS = tuple(found for name in _LOOKUPS
                       if (found := inspect.getattr_static(enum.EnumType, name, None)) is not None
                       and found is not inspect.getattr_static(type, name, None))


def _plain_lookup(cls: Any) -> bool:
    """Whether reading ``cls``'s attributes runs only ``type``'s code: its metaclass (``type``, ``ABCMeta``,
    transformers' ``ModelOutput`` metaclass, which changes only ``__setattr__``) changes none of the lookups used
    here."""
    meta = type(cls)
    for name in _LOOKUPS:
        found = inspect.getattr_static(meta, name, None)
        if found is not inspect.getattr_static(type, name, None) and found not in _KNOWN_LOOKUPS \
                and hasattr(type(found), "__get__"):
            return False  # a descriptor of the metaclass's own (a data one would run on every lookup)
    return True


def _c_base(cls: type) -> type:
    """The first type built in C in ``cls``'s MRO: the one that lays out and makes its instances."""
    return next(b for b in cls.__mro__ if not b.__flags__ & _HEAPTYPE)


class Classes:
    """Finds and fills the classes named in one file; ``refused`` maps ``module.qualname`` to why its values came
    back as plain containers (each reason once)."""

    def __init__(self, allowed: Iterable[type]) -> None:
        self._allowed = {(c.__module__, c.__qualname__): c for c in allowed}
        self._found: dict[tuple[str, str], type | str] = {}
        self.refused: dict[str, list[str]] = {}

    def _find(self, module: str, qualname: str) -> type | str:
        """The class, or why it is not rebuilt."""
        if (module, qualname) in self._allowed:
            return self._allowed[module, qualname]
        mod = sys.modules.get(module)
        if not isinstance(mod, types.ModuleType):
            return f"its module {module!r} is not imported, and loading a file imports nothing"
        obj: Any = mod
        for part in qualname.split("."):
            if obj is not mod and not (isinstance(obj, type) and _plain_lookup(obj)):
                obj = None
                break
            obj = vars(obj).get(part)
        if not isinstance(obj, type) or not _plain_lookup(obj):
            where = "it is defined inside a function" if "<locals>" in qualname else \
                f"module {module!r} holds no class of that name"
            return where
        if (obj.__module__, obj.__qualname__) != (module, qualname):
            return f"{module}.{qualname} is another name for {obj.__module__}.{obj.__qualname__}"
        return obj

    def _get(self, module: str, qualname: str, kind: str, fits: Any) -> type | None:
        """The class of a node of ``kind`` if ``fits(cls)`` says it is that kind; else None, with the reason."""
        ref = (module, qualname)
        if ref not in self._found:
            self._found[ref] = self._find(module, qualname)
        found = self._found[ref]
        if isinstance(found, str):
            self._say(module, qualname, found)
            return None
        why = fits(found)
        if why:
            self._say(module, qualname, f"the file says it is {kind}, but it {why}")
            return None
        if inspect.getattr_static(found, "__del__", None) is not None:
            self._say(module, qualname, "it defines __del__, which would run on values the file chose")
            return None
        return found

    def _refuse(self, module: str, qualname: str, exc: Exception) -> None:
        self._say(module, qualname, f"its values do not fit it ({type(exc).__name__}: {exc})")

    def _say(self, module: str, qualname: str, why: str) -> None:
        reasons = self.refused.setdefault(f"{module}.{qualname}", [])
        if why not in reasons:
            reasons.append(why)

    # -- one method per container kind: the instance, or the plain container ------------------------------------------
    def namedtuple(self, module: str, qualname: str, fields: list[str], items: list[Any]) -> tuple[Any, ...]:
        def fits(cls: type) -> str:
            found = inspect.getattr_static(cls, "_fields", None)
            if not issubclass(cls, tuple) or not isinstance(found, tuple):
                return "is not a namedtuple"
            return "" if list(found) == fields else f"has the fields {list(found)}, not {fields}"

        cls = self._get(module, qualname, "a namedtuple", fits)
        if cls is None:
            return tuple(items)
        try:
            return tuple.__new__(cls, items)  # namedtuple._make's way: no __new__ runs
        except TypeError as exc:
            self._refuse(module, qualname, exc)
            return tuple(items)

    def sequence(self, module: str, qualname: str, base: type, items: list[Any]) -> Any:
        """A tuple or list subclass (``base``) that is not a namedtuple: ``torch.return_types``, ``Size``-likes."""
        def fits(cls: type) -> str:
            if not issubclass(cls, base):
                return f"is not a {base.__name__}"
            return "is a namedtuple" if inspect.getattr_static(cls, "_fields", None) is not None else ""

        cls = self._get(module, qualname, f"a {base.__name__}", fits)
        if cls is None:
            return base(items)
        maker: Any = _c_base(cls)
        try:
            if base is tuple:
                return maker.__new__(cls, items)
            obj = maker.__new__(cls)
            list.extend(obj, items)
            return obj
        except TypeError as exc:
            self._refuse(module, qualname, exc)
            return base(items)

    def mapping(self, module: str, qualname: str, items: list[tuple[Any, Any]]) -> dict[Any, Any]:
        """A dict subclass: ``OrderedDict``, ``ModelOutput`` (a dict and a dataclass: its fields are attributes
        too, as ``ModelOutput.__setitem__`` keeps them)."""
        cls = self._get(module, qualname, "a dict", lambda c: "" if issubclass(c, dict) else "is not a dict")
        if cls is None:
            return dict(items)
        maker: Any = _c_base(cls)
        attributes = _field_names(cls) or set()
        try:
            obj = maker.__new__(cls)
            for k, v in items:
                maker.__setitem__(obj, k, v)
                if k in attributes:
                    object.__setattr__(obj, k, v)
            return obj
        except (TypeError, AttributeError) as exc:
            self._refuse(module, qualname, exc)
            return dict(items)

    def enum_member(self, module: str, qualname: str, name: str) -> enum.Enum | None:
        """Member ``name`` of an enum class, looked up in the class's own table of members (no member is made, no
        ``_missing_`` runs); None where the class or the member is not found, with the reason."""
        cls = self._get(module, qualname, "an enum", lambda c: "" if issubclass(c, enum.Enum) else "is not an enum")
        if cls is None:
            return None
        members = vars(cls).get("_member_map_")
        member = members.get(name) if type(members) is dict else None
        if not (isinstance(member, enum.Enum) and isinstance(member, cls)):
            self._say(module, qualname, f"it has no member {name!r}")
            return None
        return member

    def dataclass(self, module: str, qualname: str, fields: dict[str, Any]) -> Any:
        def fits(cls: type) -> str:
            names = _field_names(cls)
            if names is None:
                return "is not a dataclass"
            if issubclass(cls, (tuple, list, dict)) or _c_base(cls) is not object:
                return f"is a dataclass that derives from {_c_base(cls).__name__}"
            unknown = sorted(set(fields) - names)
            return f"has no field(s) {unknown}" if unknown else ""

        cls = self._get(module, qualname, "a dataclass", fits)
        if cls is None:
            return fields
        try:
            obj: Any = object.__new__(cls)
            for k, v in fields.items():  # no __init__ / __post_init__: the saved values as they were
                object.__setattr__(obj, k, v)
            return obj
        except (TypeError, AttributeError) as exc:
            self._refuse(module, qualname, exc)
            return fields


def _field_names(cls: type) -> set[str] | None:
    """The field names of a dataclass (None for another class), found without running a descriptor."""
    if not isinstance(inspect.getattr_static(cls, "__dataclass_fields__", None), dict):
        return None
    return {f.name for f in dataclasses.fields(cls)}
