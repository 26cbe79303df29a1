"""Lazy package exports (PEP 562), so ``import neuroprobe`` and ``neuroprobe --help`` stay fast.

A package lists what it exports and where each name lives; the defining module is
imported on first access (torch, transformers, scipy, pandas and seaborn load only
when a command or a caller needs them).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``.

    Parameters
    ----------
    package
        The package's ``__name__``.
    exports
        Exported name -> ``"module"`` (the attribute of that name) or ``"module:attr.path"``.
        A name that is not listed but is a submodule of ``package`` is imported as one.

    Returns
    -------
    tuple
        ``(__getattr__, __dir__)`` to assign in the package's namespace.
    """

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is not None:
            module, _, path = target.partition(":")
            value = importlib.import_module(module)
            for attr in (path or name).split("."):
                value = getattr(value, attr)
            setattr(importlib.import_module(package), name, value)  # later lookups skip this function
            return value
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{package}.{name}":
                raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(vars(importlib.import_module(package))))

    class LazyPackage(types.ModuleType):
        # An exported name that is also a submodule (``neuroprobe.lesions.lesion``, the function, in
        # module ``lesion.py``) stays the export: importing the submodule must not replace it.
        def __setattr__(self, name: str, value: Any) -> None:
            if (name in exports and isinstance(value, types.ModuleType)
                    and value.__name__ == f"{package}.{name}"):
                return
            super().__setattr__(name, value)

    sys.modules[package].__class__ = LazyPackage
    return __getattr__, __dir__
