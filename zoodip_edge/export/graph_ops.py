"""ONNX graph helpers the export passes share (quantize, winograd, projections, attention)."""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_tensor, uses_external_data

# The folder of the raw graph whose large weights ``load_lazily`` left on disk; ``weight`` reads them.
_WEIGHTS_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("weights_dir", default=None)
# Tensors up to this many elements are read at load: shape constants, norms and biases, which the
# passes read as graph structure; the rest (the weights) stay on disk until a pass reads them.
LAZY_MIN_ELEMENTS = 1 << 16
# The file, in the raw graph's folder, that ``made`` writes the weights passes make to.
MADE_FILE = "made_by_passes.data"


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


def weight(init: onnx.TensorProto) -> np.ndarray:
    """The value of an initializer, read from the raw graph's file if ``load_lazily`` left it there.

    A read does not load the bytes into the model: the pass that reads a weight replaces it (with
    int8 and scales), so the float copy lives only while it is quantized.
    """
    if not uses_external_data(init):
        return numpy_helper.to_array(init)
    folder = _WEIGHTS_DIR.get()
    if folder is None:
        raise RuntimeError(f"{init.name} is on disk, read outside lazily_loaded()")
    info = ExternalDataInfo(init)
    with open(folder / info.location, "rb") as f:
        f.seek(info.offset or 0)
        data = f.read(info.length) if info.length else f.read()
    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    return np.frombuffer(data, dtype=dtype).reshape(tuple(init.dims)).copy()


def load_lazily(path: Path) -> onnx.ModelProto:
    """The graph at ``path`` with its large weights left in their external file.

    An exported U-Net's float weights loaded whole are as large as the torch model (10 GB for
    SDXL's), and protobuf keeps a message's memory until the whole model is freed, so each weight
    replaced by its int8 form would stay alive beside it. Loaded this way only the int8 forms are
    ever in memory: passes read weights with ``weight`` inside ``weights_in``, and
    ``load_remaining`` then loads whatever large tensor no pass replaced exactly as ``onnx.load``
    would have, so the model saves to the same bytes as one loaded whole
    (tests/test_export_memory.py).
    """
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if uses_external_data(t) and int(np.prod(t.dims)) < LAZY_MIN_ELEMENTS:
            load_external_data_for_tensor(t, str(Path(path).parent))
    return model


def made(array: np.ndarray, name: str) -> onnx.TensorProto:
    """An initializer for a weight a pass makes (a projection's part), left on disk like the
    exported ones inside ``weights_in``: the next pass replaces it with its int8 form, and protobuf
    would keep the float copy until the whole graph is freed (3.3 GB of an SDXL U-Net's)."""
    folder = _WEIGHTS_DIR.get()
    if folder is None or array.size < LAZY_MIN_ELEMENTS:
        return numpy_helper.from_array(array, name)
    array = np.ascontiguousarray(array)
    with open(folder / MADE_FILE, "ab") as f:
        offset = f.tell()
        f.write(array.tobytes())
    t = onnx.TensorProto(name=name, dims=array.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                         data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", MADE_FILE), ("offset", offset), ("length", array.nbytes)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)
    return t


def weights_first(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """List first, in their order, the nodes that compute from weights alone (a weight's
    DequantizeLinear, a Winograd weight transform); returns the model and how many such nodes it has.

    ONNX Runtime orders a graph's nodes by a depth-first walk back from the outputs that visits a
    node's inputs highest index first and runs each node once its inputs have run. A weight's
    chain listed after the node that makes the activation it meets is visited first, so it runs
    long before its consumer and its float result stays alive in between: in the SDXL U-Net at
    512 px, 2.3 GB of dequantized weights at once (docs/performance.md). Listed first, each chain
    is visited last and runs right before the node that reads it. The computation is the same.
    """
    inits = {i.name for i in model.graph.initializer}
    known = set(inits)
    first, rest = [], []
    for node in model.graph.node:
        if all(not i or i in known for i in node.input):
            first.append(node)
            known.update(node.output)
        else:
            rest.append(node)
    return replace_nodes(model, first + rest), len(first)


@contextlib.contextmanager
def weights_in(folder: Path) -> Iterator[None]:
    """Where ``weight`` finds the weights that ``load_lazily`` left on disk, and where ``made``
    leaves new ones: only around passes that read weights through ``weight``."""
    token = _WEIGHTS_DIR.set(Path(folder))
    try:
        yield
    finally:
        _WEIGHTS_DIR.reset(token)


def load_remaining(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """Load every tensor still on disk into the model (the ones no pass replaced)."""
    for t in model.graph.initializer:
        if uses_external_data(t):
            by_pass = ExternalDataInfo(t).location == MADE_FILE
            load_external_data_for_tensor(t, str(folder))
            if by_pass:  # as numpy_helper.from_array leaves it: the bytes of a pass that kept it in memory
                t.ClearField("data_location")
    return model
