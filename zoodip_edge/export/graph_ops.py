"""ONNX graph helpers the export passes share (quantize, winograd, projections, attention)."""

from __future__ import annotations

import onnx


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Dims (int, or the symbol's name) of every tensor the graph declares a shape for."""
    out = {}
    for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        out[v.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
    return out


def replace_nodes(model: onnx.ModelProto, nodes: list) -> onnx.ModelProto:
    """Swap in the new node list and drop initializers nothing reads any more.

    The unread ones are deleted in place: re-adding the kept ones would copy every weight, and
    protobuf keeps a message's memory until the whole model is freed, so each such pass left
    another copy of the U-Net's weights behind (docs/performance.md).
    """
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    inits = model.graph.initializer
    for k in reversed([k for k, i in enumerate(inits) if i.name not in used]):
        del inits[k]
    return model
