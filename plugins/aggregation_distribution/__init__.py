"""Built-in estimator ``aggregation_distribution`` (reconstructed): the estimator (``estimator``, its
entry point), the aggregation layers found in the graph (``aggregations``), the distribution maths
(``maths``) and its figure (``plot``). Imports layerscope's public API and helpers only.
"""
