"""The import path of :func:`layerscope.regular_file` in layerscope 0.1, kept for plugins written against it."""

from layerscope.util.files import regular_file

__all__ = ["regular_file"]
