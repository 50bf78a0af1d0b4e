"""The import path of :func:`layerscope.lazy_module` in layerscope 0.1, kept for plugins written against it."""

from layerscope.util.lazy import lazy_module

__all__ = ["lazy_module"]
