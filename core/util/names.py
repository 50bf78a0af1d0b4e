"""Names that travel from a spec into results and file names: analysis ids and model labels.

An analysis id names output files (``plots/<id>.png``), so it is letters, digits, ``_``, ``-`` and ``.``,
never a path; a model label may also hold ``+``. The spec checks both when it is read, and
``results.json`` checks them again when it is loaded.
"""

ANALYSIS_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
MODEL_LABEL = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$"
NAME_LENGTH = 100
