"""int8-cpu's U-Net takes one (sample, timestep) for a batch of text conditions and runs the
nodes that do not read the condition once: same noise predictions as with repeated samples."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from zoodip_edge.export.prefix import broadcast_sample

from conftest import export_once


def _session(model: onnx.ModelProto, manifest: dict) -> ort.InferenceSession:
    so = ort.SessionOptions()
    for k, v in manifest["session"]["config_entries"].items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.slow  # a full export or a trained run
def test_one_sample_for_a_batch_of_conditions(sd1_pipeline, work):
    """A U-Net exported without the rewrite (int8-gpu), rewritten: one sample row broadcast to
    three conditions gives what the original gives for the sample repeated three times."""
    bundle, manifest = export_once(sd1_pipeline, "int8-gpu", work)
    assert "shared_prefix_nodes" not in manifest["recipe"]["graphs"]["unet"]
    model = onnx.load(str(bundle / manifest["components"]["unet"]["path"]))
    rewritten, shared = broadcast_sample(onnx.ModelProto.FromString(model.SerializeToString()))
    assert shared > 10  # time embedding, conv_in, the first ResNet and self-attention at least
    rng = np.random.default_rng(0)
    lat, d = manifest["latent_size"], manifest["text"]["hidden_size"]
    sample = rng.standard_normal((3, 4, lat, lat)).astype(np.float32)
    cond = rng.standard_normal((3, 77, d)).astype(np.float32)
    t = np.full((3,), 700, np.float32)
    orig, new = _session(model, manifest), _session(rewritten, manifest)
    repeated = {"sample": np.repeat(sample[:1], 3, 0), "timestep": t, "encoder_hidden_states": cond}
    expected = orig.run(None, repeated)[0]
    once = new.run(None, {"sample": sample[:1], "timestep": t[:1], "encoder_hidden_states": cond})[0]
    assert once.shape == expected.shape
    assert np.abs(once - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.abs(expected[0] - expected[1]).max() > 1e-3 * np.abs(expected).max()  # the conditions do differ
    # equal batches of different samples: the graph computes what it did
    different = {"sample": sample, "timestep": t, "encoder_hidden_states": cond}
    a, b = orig.run(None, different)[0], new.run(None, different)[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_shape_tensors_from_the_sample_are_left_alone():
    """A Reshape target computed from the sample's shape would need its batch rewritten, not rows
    repeated: the rewrite does not apply."""
    nodes = [helper.make_node("Shape", ["sample"], ["s"]),
             helper.make_node("Reshape", ["encoder_hidden_states", "s"], ["c4"]),
             helper.make_node("Mul", ["sample", "timestep4"], ["st"]),
             helper.make_node("Unsqueeze", ["timestep", "axes"], ["timestep4"]),
             helper.make_node("Add", ["c4", "st"], ["out_sample"])]
    nodes = [nodes[0], nodes[3], nodes[1], nodes[2], nodes[4]]
    f = TensorProto.FLOAT
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("sample", f, ["batch", 4, 2, 2]),
                                       helper.make_tensor_value_info("timestep", f, ["batch"]),
                                       helper.make_tensor_value_info("encoder_hidden_states", f, ["batch", 16])],
                          [helper.make_tensor_value_info("out_sample", f, ["batch", 4, 2, 2])],
                          [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    before = model.SerializeToString()
    out, shared = broadcast_sample(model)
    assert shared == 0 and out.SerializeToString() == before
