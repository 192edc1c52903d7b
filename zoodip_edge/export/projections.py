"""A projection whose output is only split into equal parts becomes one projection per part.

SD1.5's feed-forward (GEGLU) projects to 2 x 4C features and splits them into a value and a
gate. Made as one MatMul, the 2 x 4C output and the Split's two copies of it are alive
together: on a SD1.5 U-Net at 64x64 latents and batch 3, 126 MB + 2 x 63 MB per block, which set
the forward's peak beside the Winograd input transforms (docs/recipes.md). One MatMul per part
writes each half once. The same weights' columns, the same bias entries: the same numbers, and
block-wise int8 quantization (blocks along K, per column) gives each part the same int8 weights
and scales it had in the whole.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from .graph_ops import made, replace_nodes, tensor_shapes, weight


def _split_parts(split: onnx.NodeProto, inits: dict, features: int, rank: int | None) -> int | None:
    """How many equal parts ``split`` cuts a [..., features] tensor into along its last axis, or None."""
    attrs = {a.name: helper.get_attribute_value(a) for a in split.attribute}
    if attrs.get("axis", 0) != -1 and (rank is None or attrs.get("axis", 0) != rank - 1):
        return None
    parts = len(split.output)
    if len(split.input) > 1 and split.input[1]:
        sizes = inits.get(split.input[1])
        if sizes is None or len(set(weight(sizes).tolist())) != 1:
            return None
    elif "split" in attrs and len(set(attrs["split"])) != 1:
        return None
    return parts if parts > 1 and features % parts == 0 else None


def split_projections(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite MatMul(x, W) [+ bias] -> Split(last axis, equal parts) as one MatMul [+ bias] per part.

    Only where W (and the bias) are initializers and the Split is the projection's only reader.
    Returns the model and how many projections were split.
    """

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    for o in g.output:
        readers[o.name] = readers.get(o.name, 0) + 1

    shapes = tensor_shapes(model)
    gone, replace, new_inits = set(), {}, []
    for split in g.node:
        if split.op_type != "Split":
            continue
        add = producer.get(split.input[0])
        bias = None
        if add is not None and add.op_type == "Add" and readers[add.output[0]] == 1:
            bias = next((i for i in add.input if i in inits), None)
            mm = next((producer.get(i) for i in add.input if i != bias), None)
        else:
            mm, add = add, None
        if mm is None or mm.op_type != "MatMul" or mm.input[1] not in inits or readers[mm.output[0]] != 1:
            continue
        w = weight(inits[mm.input[1]])
        b = weight(inits[bias]) if bias else None
        if w.ndim != 2 or (add is not None and (b is None or b.shape != (w.shape[1],))):
            continue
        rank = len(shapes[split.input[0]]) if split.input[0] in shapes else None
        parts = _split_parts(split, inits, w.shape[1], rank)
        if parts is None:
            continue
        step, nodes = w.shape[1] // parts, []
        for j, out in enumerate(split.output):
            p = f"{mm.name or mm.output[0]}.part{j}"
            new_inits.append(made(w[:, j * step:(j + 1) * step], f"{p}.weight"))
            nodes.append(helper.make_node("MatMul", [mm.input[0], f"{p}.weight"], [out if b is None else f"{p}.mm"], name=p))
            if b is not None:
                new_inits.append(numpy_helper.from_array(b[j * step:(j + 1) * step].copy(), f"{p}.bias"))
                nodes.append(helper.make_node("Add", [f"{p}.mm", f"{p}.bias"], [out], name=f"{p}.add"))
        gone |= {id(mm), id(split)} | ({id(add)} if add is not None else set())
        replace[id(split)] = nodes
    if not replace:
        return model, 0
    nodes = []
    for n in g.node:
        if id(n) in replace:
            nodes += replace[id(n)]  # in the Split's place: after x exists, before any reader of a part
        elif id(n) not in gone:
            nodes.append(n)
    g.initializer.extend(new_inits)
    return replace_nodes(model, nodes), len(replace)
