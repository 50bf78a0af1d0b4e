"""The inverse-PCA layer (Hahn et al.): a graph rewrite that lets a network
be driven by uncorrelated PCA coordinates without retraining it.

PCA is fitted on the standardised, flattened inputs: z = ((x − μ)/s)·Wᵀ with W the
orthogonal matrix of principal directions (rows). The rewrite prepends
x = z·(W ⊙ s) + μ — one MatMul and one Add (the transpose of the orthogonal W is its
inverse, more stable than ``torch.inverse`` of the reference code) — followed by a
Reshape to the original input shape, so the new model's input is z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    import onnx
else:
    onnx = lazy_module("onnx")  # imported on first use: listing plugins does not load it


@dataclass(frozen=True)
class StandardisedPCA:
    """μ, s and the principal directions W (rows, by decreasing variance) of standardised data."""

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        """z = ((x − μ)/s)·Wᵀ for flattened samples."""
        return ((x.reshape(len(x), -1) - self.mean) / self.scale) @ self.components.T


def fit_standardised_pca(count: float, total: np.ndarray, outer: np.ndarray) -> StandardisedPCA:
    """PCA of standardised data from streamed sums: *count*, Σx and Σxxᵀ (flattened samples).

    Features with zero variance keep scale 1 (as scikit-learn's StandardScaler does).
    """
    mean = total / count
    covariance = outer / count - np.outer(mean, mean)  # population covariance, like StandardScaler
    scale = np.sqrt(np.clip(np.diag(covariance), 0, None))
    scale[scale == 0] = 1.0
    correlation = covariance / np.outer(scale, scale)
    eigenvalues, vectors = np.linalg.eigh((correlation + correlation.T) / 2)
    order = np.argsort(eigenvalues)[::-1]
    return StandardisedPCA(mean, scale, vectors[:, order].T.copy())


def prepend_inverse_pca(model: onnx.ModelProto, pca: StandardisedPCA, input_name: str = "pca_z") -> onnx.ModelProto:
    """A copy of *model* whose single input is the PCA coordinate vector z (see module docstring)."""
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    initializers = {i.name for i in graph.initializer}
    (original,) = [i for i in graph.input if i.name not in initializers]
    elem_type = original.type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in original.type.tensor_type.shape.dim]
    features = len(pca.mean)
    weights = onnx.numpy_helper.from_array((pca.components * pca.scale).astype(dtype), "inverse_pca_weight")
    bias = onnx.numpy_helper.from_array(pca.mean.astype(dtype), "inverse_pca_bias")
    shape = onnx.numpy_helper.from_array(np.array([-1, *dims[1:]], dtype=np.int64), "inverse_pca_shape")
    make_node = onnx.helper.make_node
    nodes = [
        make_node("MatMul", [input_name, weights.name], ["inverse_pca_matmul"], name="inverse_pca/matmul"),
        make_node("Add", ["inverse_pca_matmul", bias.name], ["inverse_pca_flat"], name="inverse_pca/add"),
        make_node("Reshape", ["inverse_pca_flat", shape.name], [original.name], name="inverse_pca/reshape"),
    ]
    new_nodes = nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend([weights, bias, shape])
    position = list(graph.input).index(original)
    del graph.input[position]
    batch = original.type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or (batch.dim_value if batch.HasField("dim_value") else "batch")
    graph.input.insert(position, onnx.helper.make_tensor_value_info(input_name, elem_type, [batch_dim, features]))
    return rewritten
