"""Model adapters: model sources (ONNX files, PyTorch, the demo zoo) → ONNX graphs.

Each module is a plugin registered through the ``layerscope`` entry-point group, exactly
as a third-party adapter would be.
"""
