"""The int8-cpu recipe's Winograd rewrite of 3x3 convolutions: same numbers, same derivatives,
only where it applies, and weight transforms that ORT runs right before their product."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from zoodip_edge.export.quantize import weight_only_qdq
from zoodip_edge.export.winograd import transforms, winograd_convs

from conftest import shared_bundle

C, S = 64, 32


def _graph(rng: np.random.Generator) -> onnx.ModelProto:
    """Float convolutions of every kind the rewrite must tell apart, quantized as int8-cpu does."""
    def w(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="eligible", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["y1", "w2"], ["y2"], name="no_bias", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["y2", "w3"], ["y3"], name="one_by_one", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["y3", "w4"], ["y4"], name="grouped", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=4),
        helper.make_node("Conv", ["y4", "w5"], ["y5"], name="few_channels", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["y5", "w6"], ["y6"], name="strided", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["y6", "w7"], ["y7"], name="half_size", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["y7", "w8"], ["y8"], name="strided_again", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["y8", "w9"], ["y"], name="too_small", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    inits = [w("w1", (96, C, 3, 3)), w("b1", (96,)), w("w2", (C, 96, 3, 3)), w("w3", (C, C, 1, 1)),
             w("w4", (C, C // 4, 3, 3)), w("w5", (8, C, 3, 3)), w("w6", (C, 8, 3, 3)), w("w7", (C, C, 3, 3)),
             w("w8", (C, C, 3, 3)), w("w9", (C, C, 3, 3))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C, S, S])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", C, S // 4, S // 4])], inits)
    return weight_only_qdq(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), ("Conv",))[0]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


@pytest.fixture(scope="module")
def graphs() -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(0)
    model = _graph(rng)
    rewritten, counts = winograd_convs(_copy(model))
    # "eligible" and "no_bias" with 4x4 tiles, "half_size" with 2x2 tiles; the rest are not its kind
    assert dict(counts) == {"Conv 32x32 F(4x4)": 2, "Conv 16x16 F(2x2)": 1}
    return model, rewritten, rng.standard_normal((2, C, S, S)).astype(np.float32)


@pytest.mark.parametrize("m", [2, 4])
def test_transforms_are_winograds_identity(m):
    """A^T [(G g G^T) * (B^T d B)] A equals the m x m correlation of an (m+2)^2 tile with a 3x3 filter."""
    gg, bb, aa = transforms(m)
    rng = np.random.default_rng(1)
    d, g = rng.standard_normal((m + 2, m + 2)), rng.standard_normal((3, 3))
    direct = np.array([[(d[i:i + 3, j:j + 3] * g).sum() for j in range(m)] for i in range(m)])
    assert np.allclose(aa @ ((gg @ g.ravel()) * (bb @ d.ravel())), direct.ravel(), atol=1e-12)


@pytest.mark.parametrize("batch", [1, 2])
def test_rewrite_computes_the_same_convolutions(graphs, batch):
    model, rewritten, x = graphs
    expected = _session(model).run(None, {"x": x[:batch]})[0]
    got = _session(rewritten).run(None, {"x": x[:batch]})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("Conv") == 6 + 3  # six convolutions left alone, three input transforms
    assert ops.count("DepthToSpace") == 3


def test_chunked_weight_transforms_agree(graphs):
    model, rewritten, x = graphs
    chunked, _ = winograd_convs(_copy(model), max_transform_mb=0.5)  # 36 * 96 * 64 * 4 B = 0.84 MB: 2 chunks
    assert any(n.op_type == "Concat" for n in chunked.graph.node)
    a = _session(rewritten).run(None, {"x": x})[0]
    b = _session(chunked).run(None, {"x": x})[0]
    assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()


def test_input_channels_in_parts_agree(graphs):
    """A wide convolution's input transform made per part of its channels: the parts add up to the
    same convolution, with the bias once."""
    model, rewritten, x = graphs
    # per image 36 * 64 * 8^2 * 4 B = 0.56 MB (eligible: 64 channels in at 32x32), 0.84 MB (no_bias:
    # 96), 16 * 64 * 8^2 * 4 B = 0.25 MB (half_size, F(2x2)): 2 parts, 3 parts, one
    parted, counts = winograd_convs(_copy(model), max_input_transform_mb=0.3)
    assert dict(counts) == {"Conv 32x32 F(4x4)": 2, "Conv 16x16 F(2x2)": 1}
    sums = [n for n in parted.graph.node if n.op_type == "Sum"]
    assert [len(n.input) for n in sums] == [2, 3]
    assert [n.op_type for n in parted.graph.node].count("Add") == 1  # eligible's bias, once
    a = _session(rewritten).run(None, {"x": x})[0]
    b = _session(parted).run(None, {"x": x})[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_finite_differences_follow_the_direct_graph(graphs):
    """What ZO training reads: loss differences along random directions, at a small step."""
    model, rewritten, x = graphs
    rng = np.random.default_rng(2)
    w_out = rng.standard_normal((1, C, S // 4, S // 4)).astype(np.float32)
    dirs = rng.standard_normal((8, *x[:1].shape)).astype(np.float32)
    step = 1e-3 * np.linalg.norm(x[:1]) / np.linalg.norm(dirs[0])

    def diffs(sess):
        def loss(v):
            return float((sess.run(None, {"x": v})[0].astype(np.float64) * w_out).sum())
        return np.array([loss(x[:1] + step * d) - loss(x[:1] - step * d) for d in dirs])

    a, b = diffs(_session(model)), diffs(_session(rewritten))
    assert np.corrcoef(a, b)[0, 1] > 0.9999
    assert np.abs(a - b).max() <= 5e-3 * np.abs(a).max()  # float32 rounding of both graphs' losses


def test_weight_transforms_come_before_the_activations(graphs):
    """Listed first, ORT runs each weight transform right before its product; listed after the
    activation chain, all of them ran at the start of a forward (1 GB of float U on SD1.5)."""
    _, rewritten, _ = graphs
    order = [n.name for n in rewritten.graph.node]
    first_activation = next(i for i, n in enumerate(rewritten.graph.node) if "x" in n.input)
    transforms_at = [i for i, name in enumerate(order) if name.endswith((".dq", ".w9", ".u", ".U"))]
    assert transforms_at and max(transforms_at) < first_activation


def test_rewrite_keeps_a_real_unet(sd1_pipeline, work):
    """The exported U-Net (MatMulNBits, MultiHeadAttention, dynamic batch), every 3x3 conv it can
    take rewritten: same noise prediction as the bundle's."""
    bundle, manifest = shared_bundle(sd1_pipeline, "int8-cpu", work)
    assert manifest["recipe"]["graphs"]["unet"]["winograd_convs"] == {}  # a tiny U-Net's 8x8 latents: nothing to gain
    model = onnx.load(str(bundle / manifest["components"]["unet"]["path"]))
    rewritten, counts = winograd_convs(_copy(model), min_size=4, min_channels=1)
    assert sum(counts.values()) >= 4
    rng = np.random.default_rng(3)
    lat = manifest["latent_size"]
    feed = {"sample": rng.standard_normal((2, 4, lat, lat)).astype(np.float32),
            "timestep": np.array([700, 500], np.int64),
            "encoder_hidden_states": rng.standard_normal((2, 77, manifest["text"]["hidden_size"])).astype(np.float32)}
    inputs = {i.name: i for i in model.graph.input}
    if inputs["timestep"].type.tensor_type.elem_type == TensorProto.FLOAT:
        feed["timestep"] = feed["timestep"].astype(np.float32)
    cfg = ort.SessionOptions()
    for k, v in manifest["session"]["config_entries"].items():
        cfg.add_session_config_entry(k, v)
    expected = ort.InferenceSession(model.SerializeToString(), cfg, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(rewritten.SerializeToString(), cfg, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
