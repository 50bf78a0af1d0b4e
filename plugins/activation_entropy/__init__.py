"""Built-in estimator ``activation_entropy`` (reconstructed): the estimator (``estimator``, its
entry point) and its figure (``plot``). Imports layerscope's public API and helpers only.
"""
