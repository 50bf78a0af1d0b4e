"""Names that travel from a spec into results and file names: analysis ids and model labels.

An analysis id names output files (``plots/<id>.png``), so it is letters, digits, ``_``, ``-`` and ``.``,
never a path; a model label may also hold ``+``. The spec checks both when it is read, and
``results.json`` checks them again when it is loaded.
"""

import re

ANALYSIS_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
MODEL_LABEL = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$"
NAME_LENGTH = 100


def check_name(value: str, pattern: str, what: str) -> str:
    """*value* when it matches *pattern* (:data:`ANALYSIS_ID` or :data:`MODEL_LABEL`), else a ValueError
    saying in words what *what* may hold (a pydantic validator's message)."""
    if not re.match(pattern, value):
        extra = ", '+'" if "+" in pattern else ""
        raise ValueError(
            f"{what} '{value}' may hold only ASCII letters and digits, '_', '.', '-'{extra} (not first), "
            "since it names files"
        )
    return value


def run_name(spec_name: str, run_id: str) -> str:
    """``<spec name>-<run id>``, the spec's name without path characters (``results/<this>`` is the folder of a
    run without ``outputs.dir``; trackers name their runs so)."""
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", spec_name).strip("._") or "run"  # a name, never a path
    return f"{name}-{run_id}"
