"""Map ONNX nodes back to the user's layer names.

torch's exporter records the module path of every node in the node metadata
(``pkg.torch.onnx.name_scopes``: ``['', 'features', 'features.1', 'relu']``, the last
entry being the op). The layer is the innermost module path; functional ops called at
the root take their op name. Without metadata the ONNX node name is used.
"""

from __future__ import annotations

import ast

import onnx

TORCH_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def layer_name(node: onnx.NodeProto) -> str:
    """The user's name for the layer that produced *node* (see module docstring)."""
    for prop in node.metadata_props:
        if prop.key == TORCH_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            if len(scopes) >= 2 and scopes[-2]:
                return str(scopes[-2])
            if scopes:
                return str(scopes[-1])
    return node.name or (node.output[0] if node.output else node.op_type)
