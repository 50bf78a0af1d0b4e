"""A model's graph apart from its weights: the graph in memory, the weights where they already are.

A model of hundreds of megabytes used to be held several times over: the parsed proto, a serialized copy
for every onnxruntime session and for shape inference, and onnxruntime's own copy. Here a model is read
as protobuf wire format (:func:`weight_free`): every field is copied but the bytes of large initializers,
which are skipped unread and replaced by ONNX external-data references to where they lie (``location``,
``offset``, ``length``): into the model's file, or into the one serialized copy of a model that came as an
object. The result is an ordinary ``onnx.ModelProto`` of the graph alone, with :class:`Weights` saying
where the data is: shape inference and serialization cost what the graph costs, and onnxruntime reads the
weights itself, one copy per session, as it does for a model loaded from its path. Initializers of at most
:data:`INLINE_BYTES` stay in the graph, as shape arithmetic needs their values.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from layerscope.util.files import scratch_folder
from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    import onnx
else:
    onnx = lazy_module("onnx")

#: Initializers of at most this many bytes stay inside the graph (shapes, axes, small constants).
INLINE_BYTES = 4096
#: The name of the in-memory "file" a model object's serialized bytes are handed to onnxruntime as.
MEMORY_FILE = "layerscope-model.bin"
_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5
# Field numbers of onnx.proto: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data /
# external_data / data_location, StringStringEntryProto.key / value.
_GRAPH, _INITIALIZER, _RAW_DATA, _EXTERNAL_DATA, _DATA_LOCATION, _KEY, _VALUE = 7, 5, 9, 13, 14, 1, 2
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def _varint(buffer, position: int) -> tuple[int, int]:
    """The varint at *position* and the position after it."""
    value, shift = 0, 0
    while True:
        byte = buffer[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buffer, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(field number, wire type, start of the field, start of its value, end of the field)`` of every
    field of the message in ``buffer[start:end]`` (a length-delimited value starts after its length)."""
    position = start
    while position < end:
        key, value_start = _varint(buffer, position)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            stop = _varint(buffer, value_start)[1]
        elif wire == _LEN:
            length, value_start = _varint(buffer, value_start)
            stop = value_start + length
        elif wire in (_I64, _I32):
            stop = value_start + (8 if wire == _I64 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {position}")
        yield number, wire, position, value_start, stop
        position = stop


def _field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload


def _entry(key: str, value: str) -> bytes:
    return _field(_EXTERNAL_DATA, _field(_KEY, key.encode()) + _field(_VALUE, value.encode()))


def _tensor(buffer, start: int, end: int, location: str) -> bytes:
    """The TensorProto in ``buffer[start:end]`` with large raw data turned into a reference into the file."""
    raw = next(((s, e) for number, _, _, s, e in _fields(buffer, start, end) if number == _RAW_DATA), None)
    if raw is None or raw[1] - raw[0] <= INLINE_BYTES:
        return bytes(buffer[start:end])
    out = bytearray()
    for number, _, header, _, value_end in _fields(buffer, start, end):
        if number not in (_RAW_DATA, _DATA_LOCATION):
            out += buffer[header:value_end]
    out += _entry("location", location) + _entry("offset", str(raw[0])) + _entry("length", str(raw[1] - raw[0]))
    out += _encode_varint(_DATA_LOCATION << 3 | _VARINT) + _encode_varint(_EXTERNAL)
    return bytes(out)


def _rewritten(buffer, start: int, end: int, location: str, depth: int) -> bytes:
    """The message in ``buffer[start:end]`` (depth 0: ModelProto, 1: GraphProto) without large raw data."""
    out = bytearray()
    for number, wire, header, value_start, value_end in _fields(buffer, start, end):
        if depth == 0 and number == _GRAPH and wire == _LEN:
            out += _field(_GRAPH, _rewritten(buffer, value_start, value_end, location, 1))
        elif depth == 1 and number == _INITIALIZER and wire == _LEN:
            out += _field(_INITIALIZER, _tensor(buffer, value_start, value_end, location))
        else:
            out += buffer[header:value_end]
    return bytes(out)


@dataclass
class Weights:
    """Where the large initializers of a weight-free graph are: files in *folder* (ONNX external data,
    locations relative to it), or in-memory *files* (name → bytes) for a model that came as an object."""

    folder: Path | None = None
    files: dict[str, bytes | bytearray] = field(default_factory=dict)
    #: The OrtValues of :meth:`share` by initializer name, each made once.
    _shared: dict = field(default_factory=dict, repr=False, compare=False)

    def configure(self, options) -> None:
        """Tell onnxruntime's session *options* where to read the external initializers from: the session
        reads and owns its copy of the weights (and prepacks them for its kernels)."""
        if self.folder is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.folder))
        if self.files:
            names = list(self.files)
            options.add_external_initializers_from_files_in_memory(
                names, [self.files[n] for n in names], [len(self.files[n]) for n in names]
            )

    def share(self, model: onnx.ModelProto, options) -> list:
        """Hand the session *options* the external initializers of *model* as OrtValues over the file's
        pages (memory-mapped) or the in-memory copy, each made once and the same for every session made so,
        with prepacking off: sessions of one model then hold its weights once between them (each prepacking
        its own copy would hold them once per session). Returns the values, which must outlive the
        sessions."""
        import onnxruntime as ort

        values = []
        for tensor, entries in external_tensors(model):
            if tensor.name not in self._shared:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
                offset, shape = int(entries.get("offset", 0)), tuple(tensor.dims)
                location = entries["location"]
                if location in self.files:
                    array = np.frombuffer(self.files[location], dtype, int(np.prod(shape)), offset).reshape(shape)
                else:
                    array = np.memmap(self._folder() / location, dtype, "r", offset, shape)
                self._shared[tensor.name] = ort.OrtValue.ortvalue_from_numpy(np.asarray(array))
            values.append((tensor.name, self._shared[tensor.name]))
        self.configure(options)  # where the graph's references point (onnxruntime checks them), then the values
        for name, value in values:
            options.add_initializer(name, value)
        options.add_session_config_entry("session.disable_prepacking", "1")
        return values

    def _folder(self) -> Path:
        if self.folder is None:
            raise ValueError("the model's external data lies in no folder")
        return self.folder

    def _read(self, entries: dict[str, str]) -> Iterator[bytes | memoryview]:
        """The bytes of one external initializer, a chunk at a time (views, not copies, of an in-memory file)."""
        offset, length = int(entries.get("offset", 0)), int(entries.get("length", -1))
        location = entries["location"]
        if location in self.files:
            data = memoryview(self.files[location])
            end = len(data) if length < 0 else offset + length
            for start in range(offset, end, CHUNK):
                yield data[start : min(start + CHUNK, end)]
            return
        with open(self._folder() / location, "rb") as file:
            if length < 0:
                length = os.fstat(file.fileno()).st_size - offset
            file.seek(offset)
            while length > 0:
                chunk = file.read(min(CHUNK, length))
                if not chunk:
                    raise ValueError(f"'{location}' ends before the data of an initializer")
                yield chunk
                length -= len(chunk)

    def fingerprint(self, model: onnx.ModelProto) -> str:
        """sha256 of the graph's serialized bytes and of every external initializer's bytes, read a chunk
        at a time (the model is never whole in memory)."""
        digest = hashlib.sha256(model.SerializeToString())
        for _, entries in external_tensors(model):
            for chunk in self._read(entries):
                digest.update(chunk)
        return digest.hexdigest()

    def array(self, model: onnx.ModelProto, name: str) -> np.ndarray:
        """The value of initializer *name* of *model* (read from its file or buffer when external)."""
        for tensor in model.graph.initializer:
            if tensor.name != name:
                continue
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                return onnx.numpy_helper.to_array(tensor)
            entries = {entry.key: entry.value for entry in tensor.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            return np.frombuffer(b"".join(self._read(entries)), dtype=dtype).reshape(tuple(tensor.dims))
        raise KeyError(name)


def weight_free(source: Path | onnx.ModelProto) -> tuple[onnx.ModelProto, Weights]:
    """The graph of the ONNX file or model object *source* with every initializer over :data:`INLINE_BYTES`
    left where its bytes are, and where that is. From a file, the bytes stay in it unread (a reference into
    the file's raw data; initializers already in external files keep their references). A model object is
    serialized once, and the references point into that copy; one of protobuf's 2 GB or more is saved
    with its weights in an external-data file in a new temporary folder instead."""
    if isinstance(source, Path):
        with open(source, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            view = memoryview(buffer)
            try:
                graph_only = _rewritten(view, 0, len(view), source.name, 0)
            finally:
                view.release()
        return onnx.ModelProto.FromString(graph_only), Weights(folder=source.parent)
    if source.ByteSize() >= 2**31:
        folder = scratch_folder("model")
        onnx.save_model(source, str(folder / "model.onnx"), save_as_external_data=True, location="weights.bin")
        return weight_free(folder / "model.onnx")
    serialized = source.SerializeToString()
    view = memoryview(serialized)
    try:
        graph_only = _rewritten(view, 0, len(view), MEMORY_FILE, 0)
    finally:
        view.release()
    return onnx.ModelProto.FromString(graph_only), Weights(files={MEMORY_FILE: serialized})


def external_tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, dict[str, str]]]:
    """The initializers of *model* whose data lies in files, with their external-data entries."""
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor, {entry.key: entry.value for entry in tensor.external_data}


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers *model* keeps in files."""
    return sum(int(entries.get("length", 0)) for _, entries in external_tensors(model))


CHUNK = 16 * 2**20  # bytes read at a time to fingerprint weights
