"""Built-in estimator ``mean_dimension``: the estimator (``estimator``, its entry point), the
given-data sensitivity maths (``maths``), the inverse-PCA graph rewrite (``inverse_pca``) and its
figure (``plot``). Imports layerscope's public API and helpers only.
"""
