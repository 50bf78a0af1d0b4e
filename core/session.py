"""onnxruntime sessions: provider choice and exposing the tensors a run fetches.

``device: auto`` asks for CUDA only when the CUDA provider is built in and an NVIDIA
device is present; the provider that really runs is read back from the session (an
onnxruntime-gpu wheel lists CUDA as available even on a CPU-only machine).
"""

from __future__ import annotations

import glob
from collections.abc import Iterable

import numpy as np
import onnx

from .errors import UserError
from .graph import TensorInfo

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def _nvidia_device_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or bool(glob.glob("/dev/dxg"))


def requested_providers(device: str) -> list[str]:
    import onnxruntime as ort

    cuda_built = CUDA in ort.get_available_providers()
    if device == "cuda" or (device == "auto" and cuda_built and _nvidia_device_present()):
        return [CUDA, CPU] if cuda_built else [CPU]
    return [CPU]


def expose(model: onnx.ModelProto, tensors: Iterable[TensorInfo]) -> onnx.ModelProto:
    """A copy of *model* whose graph outputs also include *tensors* (dtype/shape from inference)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output} | {i.name for i in exposed.graph.input}
    for info in tensors:
        if info.name in present:
            continue
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(info.dtype))
        exposed.graph.output.append(onnx.helper.make_tensor_value_info(info.name, elem_type, info.shape))
        present.add(info.name)
    return exposed


def create_session(model: onnx.ModelProto, device: str):
    """An ``InferenceSession`` for *model* on *device*; returns (session, provider that runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    ort.set_default_logger_severity(4)  # a missing CUDA library is reported by us, not as an ORT error dump
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=requested_providers(device))
    except Exception as error:
        raise UserError(f"onnxruntime cannot run the model: {error}") from None
    finally:
        ort.set_default_logger_severity(2)
    provider = session.get_providers()[0]
    if device == "cuda" and provider != CUDA:
        raise UserError("runtime.device: cuda was requested but onnxruntime could not start its CUDA provider "
                        "on this machine (use device: auto or cpu)")
    return session, provider
