"""Heavy frameworks imported on first use, so that ``layerscope --help``, ``plugins`` and
``validate --no-model`` start in a fraction of a second.

``torch = lazy_module("torch")`` at the top of a module binds a stand-in whose first
attribute read (``torch.tensor``) imports torch; every read is then looked up on the real
module. The stand-in is not put in ``sys.modules``: libraries that probe for torch there
(array-API helpers in scipy and scikit-learn) must not import it by looking.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


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
