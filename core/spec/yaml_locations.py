"""Safe YAML loading that remembers where every value came from.

The document is composed with PyYAML's ``SafeLoader`` (no Python objects can be
constructed) and rebuilt as plain dicts/lists/scalars, while a map from key path
(a tuple of keys and list indices) to the source position is kept, so validation
errors can be reported as ``file:line:col``.

A spec is small, so the rebuilt document is bounded: at most ``MAX_VALUES`` values once
aliases are expanded (an alias "bomb" of nested references would otherwise expand to
billions) and at most ``MAX_DEPTH`` levels of nesting.

Errors found later, by code that knows only the key it checks (a data source: ``data.path: file not
found: …``), get the key's position too: :meth:`LocatedDocument.locating_errors`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import yaml

from layerscope.util.errors import SpecError, UserError

#: The key path a message begins with: ``data.path`` of ``data.path: file not found: …``.
KEY_PATH_PREFIX = re.compile(r"([A-Za-z_]\w*(?:\.\w+)*): ")


@dataclass(frozen=True)
class Position:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class LocatedDocument:
    """Parsed YAML data plus the position of every key path in it."""

    data: Any
    filename: str
    positions: dict[tuple, Position] = field(default_factory=dict)
    #: False for a dict spec from Python, which has no lines: messages name its key paths alone.
    located: bool = True

    def where(self, path: tuple) -> str:
        """``file:line:col`` of the longest prefix of *path* that has a known position; just the
        file name for a document without lines (a dict spec from Python: its messages name the key path)."""
        if not self.located:
            return self.filename
        for end in range(len(path), -1, -1):
            position = self.positions.get(tuple(path[:end]))
            if position is not None:
                return f"{self.filename}:{position.line}:{position.column}"
        return f"{self.filename}:1:1"

    def locate(self, message: str) -> str:
        """*message* with ``file:line:col: `` in front when it begins with a key path of this document
        (``data.path: file not found: x.npz`` becomes ``spec.yaml:6:3: data.path: file not found: x.npz``;
        list indices are numbers: ``analyses.0.params``); the position is :meth:`where`'s. Unchanged when
        the document has no lines or its first key is not in the document."""
        match = KEY_PATH_PREFIX.match(message)
        if not self.located or match is None:
            return message
        path = tuple(int(part) if part.isdigit() else part for part in match.group(1).split("."))
        return f"{self.where(path)}: {message}" if path[:1] in self.positions else message

    @contextmanager
    def locating_errors(self) -> Iterator[None]:
        """Re-raise a :class:`UserError` of the block whose message begins with a key path of this document
        with the key's position in front (:meth:`locate`); a :class:`SpecError` is located already."""
        try:
            yield
        except SpecError:
            raise
        except UserError as error:
            located = self.locate(str(error))
            if located == str(error):
                raise
            raise UserError(located) from None


def _position(mark) -> Position:
    return Position(mark.line + 1, mark.column + 1)


_COLLECTION_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}
MAX_VALUES = 100_000  # values in the document once aliases are expanded
MAX_DEPTH = 50  # levels of nesting


def _build(node, path: tuple, loader: yaml.SafeLoader, doc: LocatedDocument, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0 or len(path) > MAX_DEPTH:
        mark = node.start_mark
        what = (
            f"more than {MAX_VALUES} values once aliases are expanded"
            if budget[0] < 0
            else f"more than {MAX_DEPTH} levels of nesting"
        )
        raise SpecError(
            [f"{doc.filename}:{mark.line + 1}:{mark.column + 1}: the spec has {what}; a spec needs far fewer"]
        )
    doc.positions.setdefault(path, _position(node.start_mark))
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _COLLECTION_TAGS:
        mark = node.start_mark
        raise SpecError(
            [f"{doc.filename}:{mark.line + 1}:{mark.column + 1}: invalid YAML: tag {node.tag} is not allowed"]
        )
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<)
        result: dict = {}
        for key_node, value_node in node.value:
            where = f"{doc.filename}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}"
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError([f"{where}: mapping keys must be plain scalars"])
            key = key_node.value  # keys stay text as written: YAML 1.1 would turn `on:` into True
            doc.positions[path + (key,)] = _position(key_node.start_mark)  # errors point at the key
            if key in result:
                raise SpecError([f"{where}: duplicate key '{key}'"])
            result[key] = _build(value_node, path + (key,), loader, doc, budget)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, path + (i,), loader, doc, budget) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def load_yaml(text: str, filename: str) -> LocatedDocument:
    """Parse *text* with the safe loader; raise :class:`SpecError` with a position on bad YAML."""
    doc = LocatedDocument(data=None, filename=filename)
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        doc.data = {} if node is None else _build(node, (), loader, doc, [MAX_VALUES])
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else f"{filename}:1:1"
        raise SpecError([f"{where}: invalid YAML: {error.problem or error}"]) from None
    except yaml.reader.ReaderError as error:  # a character YAML does not allow (control characters …)
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        raise SpecError(
            [
                f"{filename}:{line}:{column}: invalid YAML: character {error.character:#06x} is not "
                "allowed (control characters cannot appear in a spec)"
            ]
        ) from None
    except yaml.YAMLError as error:
        raise SpecError([f"{filename}:1:1: invalid YAML: {error}"]) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise SpecError(
            [f"{filename}:1:1: the spec has more than {MAX_DEPTH} levels of nesting; a spec needs far fewer"]
        ) from None
    finally:
        if loader is not None:
            loader.dispose()
    return doc
