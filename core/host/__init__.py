"""The plugin host: the hook specifications (``hookspecs``), loading plugins through entry points
(``loader``), the named registries of contributions (``registry``) and their descriptions for
``layerscope plugins`` (``describe``). May import :mod:`layerscope.util` only.
"""
