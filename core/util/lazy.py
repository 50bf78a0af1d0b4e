"""Heavy frameworks imported on first use, so that ``layerscope --help``, ``plugins`` and
``validate --no-model`` start in a fraction of a second.

A package's public names can be resolved the same way (:func:`lazy_exports`, PEP 562), as
``layerscope`` and ``layerscope.testing`` do.

``torch = lazy_module("torch")`` at the top of a module binds a stand-in whose first
attribute read (``torch.tensor``) imports torch; every read is then looked up on the real
module. The stand-in is not put in ``sys.modules``: libraries that probe for torch there
(array-API helpers in scipy and scikit-learn) must not import it by looking.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


class _Deferred(ModuleType):
    """Stands in for module ``__name__`` until an attribute is read."""

    def __getattr__(self, attribute: str):
        name = ModuleType.__getattribute__(self, "__name__")
        module = sys.modules.get(name) or importlib.import_module(name)
        return getattr(module, attribute)

    def __repr__(self) -> str:
        return f"<module '{self.__name__}' (imported on first use)>"


def lazy_module(name: str) -> ModuleType:
    """Module *name*: the module itself when it is already imported, else a stand-in that imports
    it when an attribute is first read."""
    return sys.modules.get(name) or _Deferred(name)


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for *package* whose public names, listed by the submodule that defines them
    (*modules*: submodule relative to *package* → names), are imported on first use and then kept in the
    package's namespace."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(f".{where[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__, sorted(where)
