"""Built-in estimator ``information_plane``: the estimator (``estimator``, its entry point), the
matrix-based Rényi entropy maths (``maths``) and its figure (``plot``). Imports layerscope's public API
and helpers only.
"""
