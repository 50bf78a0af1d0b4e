"""Ops onnxruntime cannot run: the TensorFlow ops tf2onnx leaves in a graph are rewritten into ONNX ops
computing the same function (known answers: SciPy's erfc, NumPy's expm1 and log1p), and a model that
keeps one is refused naming the op, never as a selector that matches nothing."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import helper
from scipy import special

import layerscope
from layerscope.adapters.op_rewrites import rewrite_unsupported_ops
from layerscope.cli.main import main
from layerscope.util.errors import UserError

from .conftest import write_spec


def tf2onnx_like(ops=("Erfc", "Expm1", "Log1p"), dtype=onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    """x → each of *ops*, as tf2onnx leaves ops it cannot convert: TensorFlow's names in the default domain,
    no ONNX operator of that name; every output a graph output."""
    nodes = [helper.make_node(op, ["x"], [f"{op}:0"], name=f"model/gelu/{op}") for op in ops]
    graph = helper.make_graph(
        nodes,
        "tf",
        [helper.make_tensor_value_info("x", dtype, ["N", 5])],
        [helper.make_tensor_value_info(f"{op}:0", dtype, ["N", 5]) for op in ops],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


EXPECTED = {"Erfc": special.erfc, "Expm1": np.expm1, "Log1p": np.log1p}


@pytest.mark.parametrize(
    "ops, dtype, numpy_type, tolerance",
    [
        (("Erfc", "Expm1", "Log1p"), onnx.TensorProto.FLOAT, np.float32, 1e-6),
        (("Expm1", "Log1p"), onnx.TensorProto.DOUBLE, np.float64, 1e-15),  # onnxruntime has no float64 Erf
    ],
)
def test_rewritten_ops_compute_the_functions_they_replace(ops, dtype, numpy_type, tolerance):
    rewritten = tf2onnx_like(ops, dtype)
    assert dict(rewrite_unsupported_ops(rewritten)) == dict.fromkeys(ops, 1)
    onnx.checker.check_model(rewritten, full_check=True)
    proto = tf2onnx_like(ops, dtype)
    x = np.linspace(-0.9, 3.0, 40, dtype=numpy_type).reshape(8, 5)  # log1p needs x > -1
    traced = layerscope.trace(proto, x, on={"role": "output"}, progress=False)  # the adapter rewrites a copy
    assert proto == tf2onnx_like(ops, dtype)  # the caller's model is left as it was
    for op in ops:
        assert traced[f"{op}:0"].dtype == numpy_type
        np.testing.assert_allclose(traced[f"{op}:0"], EXPECTED[op](x), rtol=0, atol=4 * tolerance, err_msg=op)
        assert traced.layers[f"{op}:0"] == f"model/gelu/{op}"  # the last node keeps the name layers come from


def test_an_onnx_file_from_tf2onnx_runs_with_its_ops_rewritten(tmp_path):
    onnx.save(tf2onnx_like(("Erfc",)), tmp_path / "tf.onnx")
    spec = write_spec(
        tmp_path,
        "model: {source: tf.onnx}\ndata: {source: synthetic, shape: [5], samples: 16}\n"
        "analyses: [{id: e, estimator: activation_entropy, on: {role: output}}]\n",
    )
    results = layerscope.run(spec, write=False, progress=False)
    assert results.models[0]["rewritten_ops"] == {"Erfc": 1}
    assert {r["layer"] for r in results.records} == {"model/gelu/Erfc"}


def test_a_model_with_an_op_onnxruntime_lacks_is_refused_naming_the_op(tmp_path, capsys):
    """Lgamma has no ONNX equivalent to rewrite into; the Erfc beside it is rewritten and not named."""
    onnx.save(tf2onnx_like(("Erfc", "Lgamma")), tmp_path / "tf.onnx")
    spec = write_spec(
        tmp_path,
        "model: {source: tf.onnx}\ndata: {source: synthetic, shape: [5]}\n"
        "analyses: [{id: e, estimator: activation_entropy, on: {role: output}}]\n",
    )
    expected = (
        f"spec.yaml:1:9: model.source: onnxruntime {onnxruntime.__version__} cannot run the model: it has no op "
        "Lgamma (domain ai.onnx, opset 17; 1 node: 'model/gelu/Lgamma') (model tf)"
    )
    for command in ("validate", "run"):
        code = main([command, str(spec)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("error:") == 1, err
        assert expected in err and "selector" not in err, err
    assert main(["inspect", str(tmp_path / "tf.onnx")]) == 0
    assert "onnxruntime cannot run the model: it has no op Lgamma" in capsys.readouterr().out
    with pytest.raises(UserError, match="it has no op Lgamma"):
        layerscope.trace(tf2onnx_like(("Lgamma",)), np.zeros((2, 5), np.float32), on="all", progress=False)
