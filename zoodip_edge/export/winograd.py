"""3x3 convolutions as Winograd F(m x m, 3x3) in plain ONNX ops, for the int8-cpu recipe.

ORT's CPU EP runs a float 3x3 convolution near the FMA peak of the cores (docs/performance.md),
so a faster convolution has to do fewer multiplications. Winograd's minimal filtering computes
each m x m output tile from an (m+2) x (m+2) input tile: with m = 4, 36 products per
input/output channel pair instead of 144, so the channel mixing becomes 36 matrix products of
1/4 the direct convolution's size. The transforms are fixed linear maps, so the result equals the
convolution up to float32 rounding (relative error ~1e-5), and finite differences keep following
the true derivatives.

Per rewritten convolution, with x [N, C, S, S], int8 weights w [Cout, C, 3, 3], K = (m+2)^2:

    U = GG @ dequantize(w) as [9, Cout*C]           -> [K, Cout, C]    (each run: weights stay int8)
    V = Conv(x as [N*C, 1, S, S], BB, stride m)     -> [N, K, C, T*T]  (T = S / m tiles a side)
    M = U @ V                                        -> [N, K, Cout, T*T]
    y = DepthToSpace(AA @ M, m) + bias               -> [N, Cout, S, S]

GG, BB and AA are the Kronecker squares of Lavin & Gray's G, B^T and A^T. U is made at run time
from the int8 weights, so the bundle's size does not change; a float U is K * Cout * C * 4 bytes
(K/9 times the dequantized weight), made in chunks of output channels of at most
``max_transform_mb`` each, each chunk freed after its product. A convolution whose input
transform V would be over ``max_input_transform_mb`` per image is made in parts of its input
channels, one Winograd convolution each, and the parts' outputs are summed.

Measured per convolution inside the SD1.5 U-Net at 512 px, batch 1 (docs/recipes.md): F(4x4)
2.0-2.6x faster at 64x64, 1.6-2.4x at 32x32. At 16x16 there are only 16 tiles per image, the
products read U once for few columns, and F(2x2) (K = 16, U 16/36 the size) beats F(4x4):
440 vs 518 ms per forward for the 11 convolutions, 578 direct (inline profiling, not kept). At 8x8 both lose (``min_size``),
and so do convolutions with a handful of channels such as conv_in/conv_out (``min_channels``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph_ops import replace_nodes, tensor_shapes, weight

# Lavin & Gray's B^T, G and A^T per output tile side m (F(m x m, 3 x 3)).
_TILES = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64)),
}


def transforms(m: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(GG [K, 9], BB [K, K], AA [m*m, K]), K = (m+2)^2: the 2-D transforms on row-major flattened tiles."""
    bt, g, at = _TILES[m]
    return np.kron(g, g), np.kron(bt, bt), np.kron(at, at)


def tile_for(size: int) -> int:
    """Output tile side for a convolution at ``size`` x ``size`` (measured, see the module doc)."""
    return 2 if size < 32 else 4


def spatial_sizes(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Static (H, W) of every 4-D tensor that shape inference can tell.

    Runs on a skeleton of the graph: weights become typed inputs, so a U-Net over protobuf's
    2 GB limit can be inferred too, and nothing large is serialized.
    """
    g = model.graph
    small = [i for i in g.initializer if int(np.prod(i.dims)) <= 4096]  # shape constants and the like
    big = [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in g.initializer if int(np.prod(i.dims)) > 4096]
    skeleton = helper.make_model(helper.make_graph(g.node, g.name, [*g.input, *big], g.output, small, value_info=g.value_info),
                                 opset_imports=model.opset_import, ir_version=model.ir_version)
    shapes = tensor_shapes(onnx.shape_inference.infer_shapes(skeleton))
    return {name: (d[2], d[3]) for name, d in shapes.items() if len(d) == 4 and isinstance(d[2], int) and isinstance(d[3], int)}


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` (at least one) contiguous ranges covering range(n), as equal as can be."""
    b = np.linspace(0, n, max(1, parts) + 1).round().astype(int)
    return list(zip(b[:-1].tolist(), b[1:].tolist()))


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _eligible(conv: onnx.NodeProto, dq: onnx.NodeProto | None, inits: dict, hw: tuple[int, int] | None,
              min_size: int, min_channels: int) -> bool:
    if conv.op_type != "Conv" or dq is None or dq.op_type != "DequantizeLinear" or hw is None:
        return False
    at = _attrs(conv)
    if (at.get("kernel_shape", [3, 3]) != [3, 3] or at.get("group", 1) != 1 or at.get("strides", [1, 1]) != [1, 1]
            or at.get("dilations", [1, 1]) != [1, 1] or at.get("pads") != [1, 1, 1, 1]
            or at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return False
    q, zp = inits.get(dq.input[0]), inits.get(dq.input[2]) if len(dq.input) > 2 else None
    if q is None or q.data_type != onnx.TensorProto.INT8 or list(q.dims[2:]) != [3, 3] or _attrs(dq).get("axis", 1) != 0:
        return False
    if min(q.dims[0], q.dims[1]) < min_channels:
        return False
    if zp is not None and weight(zp).any():
        return False  # the recipe's weights are symmetric; anything else is not ours to rewrite
    h, w = hw
    return h == w and h >= min_size and h % tile_for(h) == 0


def winograd_convs(model: onnx.ModelProto, min_size: int = 16, min_channels: int = 64,
                   max_transform_mb: float = 64.0, max_input_transform_mb: float = 24.0) -> tuple[onnx.ModelProto, Counter]:
    """Rewrite eligible DequantizeLinear(int8) -> Conv 3x3 nodes into Winograd F(m x m, 3x3).

    Eligible: stride 1, padding 1, no groups or dilation, a square static spatial size of at
    least ``min_size`` that the tile (``tile_for``) divides, at least ``min_channels`` input and
    output channels, and symmetric per-output-channel int8 weights. ``max_transform_mb`` caps
    each float U (weights), ``max_input_transform_mb`` each input transform per image.
    Returns the model and a count per spatial size and tile.
    """

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    hw = spatial_sizes(model)
    new_inits: dict[str, onnx.TensorProto] = {}

    def const(name: str, value: np.ndarray) -> str:
        if name not in new_inits:
            new_inits[name] = numpy_helper.from_array(value, name)
        return name

    def shape(dims: list[int]) -> str:
        return const("winograd.shape." + "x".join(map(str, dims)), np.array(dims, np.int64))

    weight_nodes, nodes, counts, dropped_dq = [], [], Counter(), set()

    def winograd(p: str, x: str, q: np.ndarray, scale: np.ndarray, size: int, m: int, y: str) -> None:
        """Nodes computing y = conv3x3(x, q * scale) for int8 weights q [Cout, C, 3, 3], output tile side m."""
        cout, cin = q.shape[:2]
        a, t = m + 2, size // m
        k = a * a
        gg_value, bb_value, aa_value = (v.astype(np.float32) for v in transforms(m))
        gg, aa = const(f"winograd.GG{m}", gg_value), const(f"winograd.AA{m}", aa_value)
        bb = const(f"winograd.BB{m}", bb_value.reshape(k, 1, a, a))
        nodes.extend([
            # channels as batch: one [K, 1, a, a] kernel serves every channel. A grouped Conv needs
            # it tiled per channel (31.6 MiB of constants on SD1.5) and took 0.97-1.15x the time.
            helper.make_node("Reshape", [x, shape([-1, 1, size, size])], [f"{p}.x1"], name=f"{p}.x1"),
            helper.make_node("Conv", [f"{p}.x1", bb], [f"{p}.v"], name=f"{p}.v", kernel_shape=[a, a], strides=[m, m], pads=[1, 1, 1, 1]),
            helper.make_node("Reshape", [f"{p}.v", shape([-1, cin, k, t * t])], [f"{p}.v4"], name=f"{p}.v4"),
            helper.make_node("Transpose", [f"{p}.v4"], [f"{p}.V"], name=f"{p}.V", perm=[0, 2, 1, 3]),
        ])
        # Output channels in chunks, so that no chunk's float U is over the cap: the input
        # transform V is made once and shared, and each chunk's U is freed after its product.
        products = []
        for i, (lo, hi) in enumerate(_bounds(cout, -(-k * cout * cin * 4 // int(max_transform_mb * 2**20)))):
            c = f"{p}.{i}"
            # int8 weights tap-major, so dequantizing and transforming them is one Reshape + MatMul
            wq = const(f"{c}.weight_int8", np.ascontiguousarray(q[lo:hi].transpose(2, 3, 0, 1)))
            ws = const(f"{c}.weight_scale", scale[lo:hi])
            wz = const(f"{c}.weight_zp", np.zeros(hi - lo, np.int8))
            weight_nodes.extend([
                helper.make_node("DequantizeLinear", [wq, ws, wz], [f"{c}.w"], name=f"{c}.dq", axis=2),
                helper.make_node("Reshape", [f"{c}.w", shape([9, (hi - lo) * cin])], [f"{c}.w9"], name=f"{c}.w9"),
                helper.make_node("MatMul", [gg, f"{c}.w9"], [f"{c}.u"], name=f"{c}.u"),
                helper.make_node("Reshape", [f"{c}.u", shape([k, hi - lo, cin])], [f"{c}.U"], name=f"{c}.U"),
            ])
            nodes.append(helper.make_node("MatMul", [f"{c}.U", f"{p}.V"], [f"{c}.M"], name=f"{c}.M"))
            products.append(f"{c}.M")
        if len(products) > 1:
            nodes.append(helper.make_node("Concat", products, [f"{p}.M"], name=f"{p}.M", axis=2))
        nodes.extend([
            helper.make_node("Reshape", [products[0] if len(products) == 1 else f"{p}.M", shape([0, k, cout * t * t])],
                             [f"{p}.m3"], name=f"{p}.m3"),
            helper.make_node("MatMul", [aa, f"{p}.m3"], [f"{p}.y3"], name=f"{p}.y3"),
            helper.make_node("Reshape", [f"{p}.y3", shape([0, m * m * cout, t, t])], [f"{p}.y4"], name=f"{p}.y4"),
            helper.make_node("DepthToSpace", [f"{p}.y4"], [y], name=f"{p}.d2s", blocksize=m, mode="DCR"),
        ])

    for node in model.graph.node:
        dq = producer.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if not _eligible(node, dq, inits, hw.get(node.input[0]), min_size, min_channels):
            nodes.append(node)
            continue
        q, scale = weight(inits[dq.input[0]]), weight(inits[dq.input[1]])
        cout, cin = q.shape[:2]
        size = hw[node.input[0]][0]
        m = tile_for(size)
        p = (node.name or node.output[0]).replace("/", "_") + ".winograd"
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        out = f"{p}.y" if bias else node.output[0]
        # Input channels in parts, so that no part's input transform is over the cap per image:
        # it is the convolution's largest tensor, and ORT's NCHWc Conv holds it twice while it
        # reorders, so a wide one set the forward's peak (a 960-channel one at 64x64 on SD1.5).
        # Each part is the Winograd convolution of its channels; the parts' outputs add up.
        parts = _bounds(cin, -(-(m + 2) ** 2 * cin * (size // m) ** 2 * 4 // int(max_input_transform_mb * 2**20)))
        if len(parts) == 1:
            winograd(p, node.input[0], q, scale, size, m, out)
        else:
            for j, (lo, hi) in enumerate(parts):
                # a Slice right before its part, so only one part's input copy is alive at a time
                nodes.append(helper.make_node("Slice", [node.input[0], const(f"{p}.part{j}.lo", np.array([lo], np.int64)),
                                                        const(f"{p}.part{j}.hi", np.array([hi], np.int64)),
                                                        const("winograd.channel_axis", np.array([1], np.int64))],
                                              [f"{p}.part{j}.x"], name=f"{p}.part{j}.x"))
                winograd(f"{p}.part{j}", f"{p}.part{j}.x", q[:, lo:hi], scale, size, m, f"{p}.part{j}.y")
            nodes.append(helper.make_node("Sum", [f"{p}.part{j}.y" for j in range(len(parts))], [out], name=f"{p}.sum"))
        if bias:
            b = weight(inits[bias]).astype(np.float32).reshape(cout, 1, 1)
            nodes.append(helper.make_node("Add", [out, const(f"{p}.bias", b)], [node.output[0]], name=f"{p}.bias"))
        dropped_dq.add(dq.output[0])
        counts[f"Conv {size}x{size} F({m}x{m})"] += 1
    users = {i for n in nodes for i in n.input}
    # a DequantizeLinear whose only consumers were rewritten convolutions goes too
    nodes = [n for n in nodes if not (n.op_type == "DequantizeLinear" and n.output[0] in dropped_dq and n.output[0] not in users)]
    model.graph.initializer.extend(new_inits.values())
    # Weight transforms first in the file (quantize() does the same for every weight-only chain at
    # the end, graph_ops.weights_first): ORT's execution order then runs each right before its
    # product; listed after the activation chain, all of them ran at the start of the forward and
    # their float U's (1 GB on a SD1.5 U-Net) were alive at once.
    return replace_nodes(model, weight_nodes + nodes), counts
