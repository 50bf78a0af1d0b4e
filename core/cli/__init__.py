"""The ``layerscope`` command (``main``), with ``inspect`` and the end-of-run ``summary``. May
import every other part of :mod:`layerscope`; nothing imports it but ``__main__``.
"""
