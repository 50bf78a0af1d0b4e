"""The ONNX graph as layerscope observes it: every tensor with its shape, dtype, layout and layer
name (``tensors``, ``layer_names``), the activation and attention patterns (``activations``), tensor
selectors (``selectors``), token axes (``tokens``), onnxruntime sessions exposing the fetched
tensors (``session``; several fetch groups' from one optimised graph, ``optimised_graph``) and the
pip package that installed onnxruntime (``ort_package``). May import :mod:`layerscope.util` only.
"""
