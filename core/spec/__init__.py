"""The analysis spec: safe YAML loading that keeps every value's position (``yaml_locations``) and
the typed sections checked with located errors (``schema``). May import :mod:`layerscope.util` and
:mod:`layerscope.graph` (the selector model).
"""
