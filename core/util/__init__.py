"""Small utilities every other part may use: error types and exit codes (``errors``), files read
only when regular and written atomically (``files``), heavy modules imported on first use
(``lazy``), byte sizes (``units``) and the parameter model of contributions without parameters
(``params``). Imports nothing else of layerscope.
"""
