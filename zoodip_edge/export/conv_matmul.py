"""Convolutions that are matrix products in disguise become MatMuls, for the int8-cpu recipes.

Two kinds in a SD1.5 U-Net, both rewritten on the float graph before quantization, so that the
MatMul path quantizes them (MatMulNBits, blocks of 32 along K) and ``int8-cpu-fast`` can give
them int8 compute like every other projection:

- A 1x1 convolution between the image layout and the token layout (a transformer's proj_in,
  whose output is only transposed to [B, H, W, C], and its proj_out, whose input is only a
  transpose from it) is a MatMul on the token side of that transpose, with the same number of
  transposes. Measured alone at batch 3 (SD1.5 sizes, docs/recipes.md): 0.80-0.95x the
  convolution's time with float compute, 0.57-0.68x with int8 compute.
- A 3x3 convolution (stride 1, padding 1) on a small image (8x8 in SD1.5 at 512 px) is a MatMul
  of its im2col patches: [B, H*W, C*9] x [C*9, Cout]; the patches are 9x the input, a few MB
  at 8x8. Only with int8 compute: 0.70-0.73x the convolution's time, but 2.1-2.2x with float
  compute (MatMulNBits dequantizes the 15M-weight matrix for only 192 rows).

The rewritten graph computes the same function to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

TO_TOKENS, TO_IMAGE = [0, 2, 3, 1], [0, 3, 1, 2]
IM2COL_MAX_SIZE = 8  # largest image side whose 3x3 convolutions the int8-compute recipe makes im2col MatMuls


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _plain(conv: onnx.NodeProto, kernel: int) -> bool:
    """Stride 1, no groups or dilation, 'same' padding for the kernel."""
    at = _attrs(conv)
    pad = kernel // 2
    return (at.get("kernel_shape", [kernel, kernel]) == [kernel, kernel] and at.get("group", 1) == 1
            and at.get("strides", [1, 1]) == [1, 1] and at.get("dilations", [1, 1]) == [1, 1]
            and at.get("pads", [0, 0, 0, 0]) == [pad] * 4 and at.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))


def conv_matmuls(model: onnx.ModelProto, max_im2col_size: int = IM2COL_MAX_SIZE) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Rewrite the float graph's token-side 1x1 and small 3x3 convolutions into MatMuls.

    ``max_im2col_size``: largest square spatial size whose 3x3 convolutions become im2col
    MatMuls (0: none). Returns the model and how many of each kind were rewritten.
    """
    from .quantize import _replace_nodes
    from .winograd import spatial_sizes

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    hw = spatial_sizes(model) if max_im2col_size else {}
    new_inits: dict[str, onnx.TensorProto] = {}

    def const(name: str, value: np.ndarray) -> str:
        if name not in new_inits:
            new_inits[name] = numpy_helper.from_array(value, name)
        return name

    def only_reader(tensor: str) -> onnx.NodeProto | None:
        r = readers.get(tensor, [])
        return r[0] if len(r) == 1 and tensor not in outputs else None

    def weights(conv: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None] | None:
        w = inits.get(conv.input[1])
        b = inits.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if w is None or w.data_type != onnx.TensorProto.FLOAT or (len(conv.input) > 2 and conv.input[2] and b is None):
            return None
        return numpy_helper.to_array(w), (numpy_helper.to_array(b) if b is not None else None)

    def matmul(p: str, conv: onnx.NodeProto, x: str, w: np.ndarray, b: np.ndarray | None, y: str) -> list[onnx.NodeProto]:
        """y = x @ w [+ b], w as [K, N] (MatMulNBits' quantizer reads MatMul B initializers).
        The new weights keep the convolution's weight names, suffixed: inspect and tests read them."""
        wt = const(f"{conv.input[1]}.as_matmul", np.ascontiguousarray(w))
        if b is None:
            return [helper.make_node("MatMul", [x, wt], [y], name=f"{p}.matmul")]
        return [helper.make_node("MatMul", [x, wt], [f"{p}.mm"], name=f"{p}.matmul"),
                helper.make_node("Add", [f"{p}.mm", const(f"{conv.input[2]}.as_matmul", b.astype(np.float32))], [y], name=f"{p}.bias")]

    gone: set[int] = set()
    replace: dict[int, list[onnx.NodeProto]] = {}
    counts = {"1x1": 0, "3x3_im2col": 0}
    for conv in g.node:
        if conv.op_type != "Conv" or id(conv) in gone:
            continue
        wb = weights(conv)
        if wb is None:
            continue
        w, b = wb
        p = conv.name or conv.output[0]
        cout, cin = w.shape[:2]
        if w.shape[2:] == (1, 1) and _plain(conv, 1):
            after, before = only_reader(conv.output[0]), producer.get(conv.input[0])
            if after is not None and after.op_type == "Transpose" and _attrs(after).get("perm") == TO_TOKENS:
                # Conv -> to tokens  ==>  to tokens -> MatMul
                replace[id(conv)] = [helper.make_node("Transpose", [conv.input[0]], [f"{p}.tokens"], name=f"{p}.tokens", perm=TO_TOKENS),
                                     *matmul(p, conv, f"{p}.tokens", w.reshape(cout, cin).T, b, after.output[0])]
                gone.add(id(after))
                counts["1x1"] += 1
            elif (before is not None and before.op_type == "Transpose" and _attrs(before).get("perm") == TO_IMAGE
                  and only_reader(before.output[0]) is conv):
                # to image -> Conv  ==>  MatMul -> to image
                replace[id(conv)] = [*matmul(p, conv, before.input[0], w.reshape(cout, cin).T, b, f"{p}.tokens"),
                                     helper.make_node("Transpose", [f"{p}.tokens"], [conv.output[0]], name=f"{p}.image", perm=TO_IMAGE)]
                gone.add(id(before))
                counts["1x1"] += 1
        elif w.shape[2:] == (3, 3) and _plain(conv, 3):
            size = hw.get(conv.input[0])
            if size is None or size[0] != size[1] or size[0] > max_im2col_size:
                continue
            s = size[0]
            nodes = [helper.make_node("Pad", [conv.input[0], const("im2col.pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))],
                                      [f"{p}.padded"], name=f"{p}.pad")]
            taps = []
            for i in range(3):
                for j in range(3):
                    nodes.append(helper.make_node(
                        "Slice", [f"{p}.padded", const(f"im2col.start{i}{j}", np.array([i, j], np.int64)),
                                  const(f"im2col.end{i}{j}.{s}", np.array([i + s, j + s], np.int64)), const("im2col.axes", np.array([2, 3], np.int64))],
                        [f"{p}.tap{i}{j}"], name=f"{p}.tap{i}{j}"))
                    nodes.append(helper.make_node("Unsqueeze", [f"{p}.tap{i}{j}", const("im2col.axis2", np.array([2], np.int64))],
                                                  [f"{p}.tap{i}{j}.u"], name=f"{p}.tap{i}{j}.u"))
                    taps.append(f"{p}.tap{i}{j}.u")
            nodes += [
                helper.make_node("Concat", taps, [f"{p}.taps"], name=f"{p}.taps", axis=2),  # [B, C, 9, S, S]
                helper.make_node("Transpose", [f"{p}.taps"], [f"{p}.taps_t"], name=f"{p}.taps_t", perm=[0, 3, 4, 1, 2]),
                helper.make_node("Reshape", [f"{p}.taps_t", const(f"im2col.rows.{s}x{cin}", np.array([0, s * s, cin * 9], np.int64))],
                                 [f"{p}.patches"], name=f"{p}.patches"),  # [B, S*S, C*9], (c, kh, kw) as w's layout
                *matmul(p, conv, f"{p}.patches", w.reshape(cout, cin * 9).T, b, f"{p}.rows"),
                helper.make_node("Transpose", [f"{p}.rows"], [f"{p}.cols"], name=f"{p}.cols", perm=[0, 2, 1]),
                helper.make_node("Reshape", [f"{p}.cols", const(f"im2col.image.{cout}x{s}", np.array([0, cout, s, s], np.int64))],
                                 [conv.output[0]], name=f"{p}.image"),
            ]
            replace[id(conv)] = nodes
            counts["3x3_im2col"] += 1
    if not replace:
        return model, counts
    nodes = []
    for n in g.node:
        if id(n) in replace:
            nodes += replace[id(n)]
        elif id(n) not in gone:
            nodes.append(n)
    g.initializer.extend(new_inits.values())
    return _replace_nodes(model, nodes), counts
