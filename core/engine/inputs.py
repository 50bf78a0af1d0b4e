"""The files a run reads, as the spec names them: checked on every Ray node, or sent with the run.

The run's files are the strings of the spec's ``model``, ``models`` and ``data`` sections (``data.source``,
a plugin's name, aside) that name an existing file or folder, relative to the spec's folder or absolute,
the checkpoint files the models' ``checkpoints`` matched, and the module files of ``python:``
references (``mlp:make_mlp`` → ``mlp.py`` or the package folder ``mlp/`` in the spec's folder). A
folder stands for every file under it. :func:`named_files` lists them as the driver sees them.

A Ray worker on another machine reads them at the same paths (a shared filesystem, or copies at the
same place); :func:`check_present` fails a worker that lacks one with a message naming it. With
``runtime.ship`` the driver puts their contents into Ray's object store instead (:class:`Shipment`),
and each worker writes them under a folder of its own that mirrors the absolute paths
(``<folder>/root/<path>``), reads the spec's folder there, and has absolute paths in the spec and the
checkpoint list pointed there (:class:`Relocation`); messages and model details name the original paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerscope.model.adapter import Checkpoint
from layerscope.spec.yaml_locations import LocatedDocument
from layerscope.util.errors import UserError
from layerscope.util.files import scratch_folder

from .lifecycle import ShardOutcome

if TYPE_CHECKING:
    from .plan import RunPlan


@dataclass(frozen=True)
class NamedFile:
    """A file or folder the run reads: where the spec names it (``data.path``, ``checkpoint epoch_02``)
    and its absolute path on the driver's machine."""

    key: str
    path: str


def named_files(plan: RunPlan, checkpoints: list[Checkpoint]) -> list[NamedFile]:
    """The files and folders the run reads (module docstring), each once, in the order the spec names them."""
    base_dir = plan.spec.base_dir
    found: dict[str, NamedFile] = {}

    def add(key: str, value: Any) -> None:
        path = _existing(value, base_dir)
        if path is not None:
            found.setdefault(str(path), NamedFile(key, str(path)))

    def walk(value: Any, key: tuple) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                if key + (name,) != ("data", "source"):
                    walk(item, key + (name,))
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                walk(item, key + (index,))
        elif isinstance(value, str) and key and key[-1] == "python":
            for path in _module_paths(value):
                add(".".join(map(str, key)), path)
        elif isinstance(value, str | os.PathLike):
            add(".".join(map(str, key)), value)

    document = plan.doc.data if isinstance(plan.doc.data, dict) else {}
    for section in ("model", "models", "data"):
        walk(document.get(section), (section,))
    listed = "model.checkpoints" if "model" in document else "models"  # where the checkpoints' files are named
    for checkpoint in checkpoints:
        walk(checkpoint.ref, tuple(listed.split(".")))
    return list(found.values())


def _existing(value: Any, base_dir: Path) -> Path | None:
    """The absolute path *value* names (relative to *base_dir*), when it is an existing file or folder."""
    if not str(value):
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    try:
        return path.absolute() if path.exists() else None
    except (OSError, ValueError):  # a name too long, a NUL character: not a path
        return None


def _module_paths(reference: str) -> tuple[str, str]:
    """Where the module of a ``package.module:function`` reference may lie, relative to the spec's folder:
    ``package.py`` or the package folder ``package/``."""
    top = reference.partition(":")[0].split(".")[0]
    return f"{top}.py", top


def check_present(files: list[NamedFile], node: str, relocation: Relocation | None = None) -> None:
    """Fail, naming the first file of *files* that this machine (Ray node *node*) lacks."""
    for named in files:
        path = relocation.local(named.path) if relocation else named.path
        if not os.path.exists(path):
            raise UserError(
                f"{named.key}: {named.path} is not on the Ray node {node}; the nodes of a cluster read the "
                "spec's files at the same paths (a shared filesystem, or copies at the same place), or set "
                "runtime.ship: true to send them with the run"
            )


@dataclass
class Shipment:
    """The contents of a run's files in Ray's object store: (absolute path, object reference) per file."""

    files: list[tuple[str, Any]]

    @classmethod
    def pack(cls, files: list[NamedFile]) -> Shipment:
        """Put every file of *files* (every file under a folder) into the object store, once each."""
        import ray

        paths = []
        for named in files:
            root = Path(named.path)
            paths += sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        return cls([(str(path), ray.put(path.read_bytes())) for path in dict.fromkeys(paths)])

    def unpack(self) -> Relocation:
        """On a worker: write the files under a new folder of this process and return where they lie."""
        import ray

        root = scratch_folder("shipped") / "root"
        for path, contents in self.files:
            target = root / Path(path).relative_to(Path(path).anchor)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(ray.get(contents))
        return Relocation(root, {path for path, _ in self.files})


@dataclass
class Relocation:
    """Where a worker's copies of the shipped files lie: every absolute path *p* at ``root/p``."""

    root: Path
    shipped: set[str]

    def local(self, path: str) -> str:
        """Where the copy of *path* lies (a file or folder of the run's)."""
        return str(self.root / Path(path).relative_to(Path(path).anchor))

    def value(self, value: Any) -> Any:
        """*value* (from the spec, or a checkpoint's reference; lists, tuples and dicts throughout) with each
        absolute path of a shipped file, or of a folder holding one, replaced by its copy."""
        if isinstance(value, dict):
            return {key: self.value(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.value(item) for item in value)
        if isinstance(value, str | Path) and str(value):
            path = Path(value).expanduser()
            if path.is_absolute() and any(p == str(path) or p.startswith(f"{path}{os.sep}") for p in self.shipped):
                return type(value)(self.local(str(path)))
        return value

    def arguments(self, arguments: tuple) -> tuple:
        """The worker arguments of :func:`~layerscope.engine.process_pool.worker_arguments` pointed at the copies:
        the spec's folder, its absolute paths and the checkpoints'."""
        document, base_dir, threads, checkpoints, *rest = arguments
        document = LocatedDocument(self.value(document.data), document.filename, document.positions, document.located)
        checkpoints = [replace(checkpoint, ref=self.value(checkpoint.ref)) for checkpoint in checkpoints]
        folder = Path(self.local(base_dir))
        folder.mkdir(parents=True, exist_ok=True)  # relative paths and python modules are read there
        return (document, str(folder), threads, checkpoints, *rest)

    def strip(self, text: str) -> str:
        """*text* with the copies' paths named as the originals (``root/p`` → ``p``)."""
        return text.replace(str(self.root), "")

    def restore(self, outcome: ShardOutcome) -> ShardOutcome:
        """*outcome* with the copies' paths in its model details, warnings and error named as the originals."""
        outcome.warnings = [self.strip(warning) for warning in outcome.warnings]
        outcome.error = self.strip(outcome.error) if outcome.error is not None else None
        if outcome.model_info is not None:
            outcome.model_info = {
                key: self.strip(value) if isinstance(value, str) else value for key, value in outcome.model_info.items()
            }
        return outcome
