"""Built-in estimator ``nonlinearity_signature``: the estimator (``estimator``, its entry point) and
the affinity-score maths (``maths``). Imports layerscope's public API and helpers only.
"""
