"""Export recipes: how each graph's weights are stored, and what ORT must be told to load them.

Weights only, with one measured exception: ZOODiP reads loss differences of order mu * grad,
and int8 activations on per-tensor grids turn the loss into a step function of the token
(docs/recipes.md). ``int8-cpu-fast`` rounds MatMul inputs per block of 32, and not where the
perturbed condition enters; its learning is checked on the toy world.

- ``int8-gpu``: every Linear/Conv weight as per-channel symmetric int8 + DequantizeLinear
  (explicit QDQ, weight-only). CUDA EP keeps int8 weights and computes in float; TensorRT EP
  reads the QDQ directly. No QOperator ops, which CUDA EP would run on the CPU.
- ``int8-cpu``: MatMul weights quantized as MatMulNBits (bits=8, blocks of 32), then stored as
  block-wise DequantizeLinear + MatMul (text encoder and U-Net): each run dequantizes a weight
  whole for a plain float GEMM, faster than MatMulNBits' float path (dequantized_matmuls).
  Conv/Gemm weights as in ``int8-gpu``. A projection that is only split (GEGLU) becomes one per part
  (projections.py), the U-Net's 3x3 convolutions Winograd convolutions (winograd.py), and the
  U-Net takes one sample for a batch of text conditions (prefix.py).
- ``int8-cpu-fast``: ``int8-cpu`` whose U-Net MatMuls compute in int8 (MatMulNBits accuracy
  level 4), except the cross-attention K/V projections, which read ``encoder_hidden_states``.
- ``fp16``: float16 weights and activations, float32 graph inputs/outputs (GPU targets).
- ``fp32``: the exported graph unchanged (reference; parity within 1e-4).
- ``w8a8-dynamic``: EXPERIMENT. ORT dynamic quantization (uint8 activations). The ZO
  fidelity gate refuses it unless ``--allow-unfaithful``.
- ``w8a8-static``: EXPERIMENT. U-Net MatMuls and Convs compute in int8 on fixed, calibrated
  uint8 activation grids (MatMulIntegerToFloat, QLinearConv); text encoder, VAE and the
  cross-attention K/V projections as ``int8-cpu``. 2.6x faster U-Net on CPU than ``int8-cpu``,
  and refused by the ZO fidelity gate like every activation-quantized graph so far.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

# The recipe table is plain data (zoodip_edge/recipes.py), so the CLI lists it without onnx.
from ..recipes import DEFAULT_RECIPE, FLOAT_COMPUTE, KEEP_DEQUANTIZED, RECIPES, Recipe  # noqa: F401
from .graph_ops import replace_nodes
from .prefix import CONDITION, broadcast_sample  # CONDITION: where the perturbed token enters the U-Net


def quantize(model: onnx.ModelProto, recipe: str, calibration: list[dict[str, np.ndarray]] | None = None,
             graph: str = "") -> tuple[onnx.ModelProto, dict]:
    """Apply a recipe to one graph; returns the new model and a summary of what changed.

    ``calibration``: input feeds, for a recipe with ``Recipe.calibrated``. ``graph``: the
    graph's name in the bundle (``unet``, ...), for what a recipe does to some graphs only.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}")
    if RECIPES[recipe].calibrated and not calibration:
        raise ValueError(f"recipe {recipe} needs calibration inputs")
    if recipe == "fp32":
        return model, {"weights": _weight_dtypes(model)}
    if recipe == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
        return unique_node_names(drop_repeated_nodes(model)), {"weights": _weight_dtypes(model)}
    info: dict = {}
    scheme = RECIPES[recipe].scheme or recipe
    if scheme == "int8-gpu":
        model, counts = weight_only_qdq(model, ("MatMul", "Gemm", "Conv"))
    elif scheme == "int8-cpu":
        from .projections import split_projections

        model, info["split_projections"] = split_projections(model)  # before quantizing: one MatMulNBits per part
        model, counts = matmul_nbits8(model)
        model, more = weight_only_qdq(model, ("Gemm", "Conv"))
        counts.update(more)
    elif scheme == "w8a8-dynamic":
        model, counts = dynamic_w8a8(model)
    elif scheme == "w8a8-static":
        # encoder_hidden_states: one token's row moves by mu there; a per-tensor grid would erase it
        model, counts = static_w8a8(model, calibration, keep_float=(CONDITION,))
        model, rest = weight_only_qdq(model, ("MatMul", "Gemm", "Conv"))
        counts.update({f"{k} (weight-only)": v for k, v in rest.items()})
    info = {"quantized_ops": dict(counts), **info}
    if graph in RECIPES[recipe].winograd:
        from .winograd import winograd_convs

        model, wino = winograd_convs(model)
        info["winograd_convs"] = dict(wino)
    if graph in RECIPES[recipe].shared_prefix:
        model, info["shared_prefix_nodes"] = broadcast_sample(model)
    if graph in RECIPES[recipe].int8_matmul:
        model, info["int8_matmul"] = int8_matmul_compute(model)
    if graph in RECIPES[recipe].dequantized_matmul:
        model, info["dequantized_matmuls"] = dequantized_matmuls(model)
    return model, {**info, "weights": _weight_dtypes(model)}


def drop_repeated_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop a node that repeats an earlier one exactly (same op, inputs, outputs, attributes).

    onnxruntime 1.30's float16 converter inserted the same Cast twice in an SD1.5 VAE decoder,
    both defining ``val_74_cast_to_fp32``; ORT refuses a graph that defines a name twice
    (docs/results/2026-11-27-h200/export_fp16_duplicate_name.log). Two *different* nodes defining one name are a real error.
    """
    def same(a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
        a, b = onnx.NodeProto.FromString(a.SerializeToString()), onnx.NodeProto.FromString(b.SerializeToString())
        a.name = b.name = ""
        return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)

    producer: dict[str, onnx.NodeProto] = {}
    keep = []
    for node in model.graph.node:
        first = next((producer[o] for o in node.output if o in producer), None)
        if first is not None:
            if not same(first, node):
                raise ValueError(f"two different nodes define {next(o for o in node.output if o in producer)!r}")
            continue
        producer.update((o, node) for o in node.output if o)
        keep.append(node)
    if len(keep) < len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return model


def unique_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every repeated node name a suffix: ORT refuses a graph with two nodes of one name.

    onnxruntime 1.30's float16 converter names a Cast after the tensor it casts, so a tensor cast
    for two consumers gave two ``<tensor>_cast_to_fp32_node`` nodes: an SD1.5 fp16 export failed
    at its gates with "two nodes with same node name" (docs/results/2026-11-27-h200/export_fp16_duplicate_node.log).
    """
    seen: Counter = Counter(n.name for n in model.graph.node if n.name)
    taken = set(seen)
    count: Counter = Counter()
    for node in model.graph.node:
        if node.name and seen[node.name] > 1:
            count[node.name] += 1
            if count[node.name] > 1:  # the first keeps its name
                new = f"{node.name}_{count[node.name]}"
                while new in taken:
                    new += "_"
                taken.add(new)
                node.name = new
    return model


def _weight_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Parameter count per storage dtype: shows that int8 recipes really hold int8."""
    out: Counter = Counter()
    for init in model.graph.initializer:
        out[onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name] += int(np.prod(init.dims))
    return dict(out)


def _symmetric_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.abs(w).max(axis=reduce) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def _weight_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Conv":
        return 0  # [out, in/groups, kh, kw]
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1  # MatMul B is [K, N]: one scale per output column


def weight_only_qdq(model: onnx.ModelProto, op_types: tuple[str, ...]) -> tuple[onnx.ModelProto, Counter]:
    """Replace float weights of ``op_types`` with int8 + per-channel DequantizeLinear."""
    inits = {i.name: i for i in model.graph.initializer}
    done: dict[str, str] = {}
    dq_nodes, new_nodes, counts = [], [], Counter()
    for node in model.graph.node:
        name = node.input[1] if node.op_type in op_types and len(node.input) > 1 else None
        init = inits.get(name) if name else None
        if init is not None and init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 2:
            if name not in done:
                axis = _weight_axis(node)
                q, scale = _symmetric_int8(numpy_helper.to_array(init), axis)
                qname, sname, zname = f"{name}_int8", f"{name}_scale", f"{name}_zp"
                model.graph.initializer.extend([
                    numpy_helper.from_array(q, qname),
                    numpy_helper.from_array(scale, sname),
                    numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), zname),
                ])
                done[name] = f"{name}_dq"
                dq_nodes.append(helper.make_node("DequantizeLinear", [qname, sname, zname], [done[name]],
                                                 name=f"{name}_DequantizeLinear", axis=axis))
            node.input[1] = done[name]
            counts[node.op_type] += 1
        new_nodes.append(node)
    # DequantizeLinear nodes first in the file: ORT orders nodes by a reverse DFS from the outputs
    # that visits a node's inputs highest index first, so a DQ listed *after* the activation's
    # producer can run long before its consumer (on a SD1.5 U-Net two 56 MiB fp32 weights were
    # held for seconds, docs/performance.md). Listed first, each runs right before its consumer.
    return replace_nodes(model, dq_nodes + new_nodes), counts


def matmul_nbits8(model: onnx.ModelProto, block_size: int = 32) -> tuple[onnx.ModelProto, Counter]:
    """MatMul weights -> MatMulNBits bits=8, symmetric, block-wise; float compute (accuracy_level 0)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    before = Counter(n.op_type for n in model.graph.node)["MatMul"]
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=0, bits=8,
                                       op_types_to_quantize=("MatMul",))
    q = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=0, algo_config=cfg)
    q.process()
    out = q.model.model
    ops = Counter(n.op_type for n in out.graph.node)
    if ops["MatMulNBits"] == 0 and before:
        raise RuntimeError("MatMulNBitsQuantizer left every MatMul unquantized")
    return out, Counter({"MatMul": ops["MatMulNBits"]})


def int8_matmul_compute(model: onnx.ModelProto, keep_float: tuple[str, ...] = (CONDITION,),
                        level: int = 4) -> tuple[onnx.ModelProto, int]:
    """MatMulNBits nodes compute in int8 (``accuracy_level`` 4: ORT rounds the input to int8 per
    block of 32 along K), except those reading a tensor in ``keep_float``; returns how many changed.

    Measured on the toy world (docs/recipes.md): with the cross-attention K/V projections, which
    read ``encoder_hidden_states``, in int8 too, ZOODiP closed 0.53 of the gap against 0.79 in
    float; with them kept float, 0.75.
    """
    count = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.input[0] not in keep_float:
            keep = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*keep, helper.make_attribute("accuracy_level", level)])
            count += 1
    return model, count


def dequantized_matmuls(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Each float-compute 8-bit MatMulNBits becomes a block-wise DequantizeLinear + MatMul.

    The same int8 weights and scales, in the same bytes: each run dequantizes a weight whole (a
    transient float copy, at most 26 MB in SD1.5) and a plain float GEMM multiplies it. ORT's
    MatMulNBits float path took 1.2-2.2x a float MatMul's time at a batched step's sizes on an
    AVX2 CPU (benchmarks/experiments/matmul_forms.py --batch 3); the SD1.5 U-Net forward 0.93x as long for
    +32 MB (docs/recipes.md). Needs KEEP_DEQUANTIZED in the bundle's session config.
    """
    if next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) < 21:
        return model, 0  # block-wise DequantizeLinear is opset 21 (the exporter writes 23)
    inits = {i.name: i for i in model.graph.initializer}
    nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "MatMulNBits" or attrs.get("bits") != 8 or attrs.get("accuracy_level", 0) != 0
                or len([i for i in node.input if i]) != 3 or node.input[1] not in inits or node.input[2] not in inits):
            nodes.append(node)  # zero points, group index, bias or int8 compute: left as they are
            continue
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        # [N, blocks, block] uint8 with the implicit zero point 128 -> [K, N] int8 (padding cut)
        q = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1)[:, :k].astype(np.int16) - 128
        scale = numpy_helper.to_array(inits[node.input[2]]).reshape(n, -1)
        p = (node.name or node.output[0]) + ".dq"
        model.graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(q.T.astype(np.int8)), f"{p}.weight_int8"),
                                        numpy_helper.from_array(np.ascontiguousarray(scale.T), f"{p}.weight_scale")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{p}.weight_int8", f"{p}.weight_scale"], [f"{p}.weight"],
                                      name=p, axis=0, block_size=block))
        nodes.append(helper.make_node("MatMul", [node.input[0], f"{p}.weight"], list(node.output), name=node.name))
        count += 1
    if count:
        replace_nodes(model, nodes)
    return model, count


def dynamic_w8a8(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Counter]:
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
        onnx.save_model(model, src, save_as_external_data=True, location="in.onnx.data")
        # Attention is left alone: its quantized rewrite (QAttention) fails to load at opset 23.
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Conv"],
                         per_channel=True, use_external_data_format=True)
        out = onnx.load(dst)
    ops = Counter(n.op_type for n in out.graph.node)
    return out, Counter({k: v for k, v in ops.items() if "Integer" in k or "Quant" in k})


def activation_ranges(model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]],
                      offsets: dict[str, np.ndarray] | None = None) -> dict[str, tuple[float, float]]:
    """min/max of the named tensors over calibration feeds (minus a per-channel offset where given).

    Runs the float graph with those tensors exposed as outputs. The model is written to a
    temporary folder with external data (a U-Net is above protobuf's 2 GB) and comes back unchanged.
    """
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    offsets = offsets or {}
    n_out = len(model.graph.output)
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names if n not in known)
    lo = dict.fromkeys(names, np.inf)
    hi = dict.fromkeys(names, -np.inf)
    try:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "calibrate.onnx"
            onnx.save_model(model, path, save_as_external_data=True, location="calibrate.onnx.data")
            # save_model moved the weights out of the proto; bring them back before the folder goes
            onnx.external_data_helper.load_external_data_for_model(model, d)
            so = ort.SessionOptions()
            so.enable_cpu_mem_arena = False
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            for feed in feeds:
                for name, y in zip(names, sess.run(names, feed)):
                    if name in offsets:
                        y = y - offsets[name].reshape(1, -1, *([1] * (y.ndim - 2)))
                    lo[name], hi[name] = min(lo[name], float(y.min())), max(hi[name], float(y.max()))
            del sess
    finally:
        del model.graph.output[n_out:]
    return {n: (lo[n], hi[n]) for n in names}


def _uint8_grid(lo: float, hi: float, margin: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of a uint8 grid covering [lo, hi] widened by ``margin`` (and 0)."""
    lo, hi = min(lo * margin, 0.0), max(hi * margin, 0.0)
    scale = np.float32(max(hi - lo, 1e-8) / 255.0)
    return scale, np.uint8(np.clip(np.rint(-lo / scale), 0, 255))


def static_w8a8(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], margin: float = 1.25,
                keep_float: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, Counter]:
    """Int8 compute for every constant-weight MatMul and Conv, with *fixed* activation grids.

    - MatMul(x, W) -> QuantizeLinear(x) -> MatMulIntegerToFloat (float output)
    - Conv(x, W, b) -> QuantizeLinear(x) -> QLinearConv -> DequantizeLinear -> Add(b)

    Weights: per-channel symmetric int8. Activations: uint8 on grids calibrated once from
    ``feeds``. Fixed grids are what keeps finite differences usable: a per-call (dynamic)
    scale moves every rounding boundary between the base and the perturbed forward.
    """
    inits = {i.name: i for i in model.graph.initializer}

    def const_weight(n: onnx.NodeProto) -> bool:
        w = inits.get(n.input[1]) if n.op_type in ("MatMul", "Conv") and len(n.input) > 1 else None
        return (w is not None and w.data_type == onnx.TensorProto.FLOAT and (n.op_type == "Conv" or len(w.dims) == 2)
                and n.input[0] not in keep_float)

    targets = [n for n in model.graph.node if const_weight(n)]
    offsets = {n.output[0]: numpy_helper.to_array(inits[n.input[2]]) for n in targets
               if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in inits}
    names = list(dict.fromkeys([n.input[0] for n in targets] + [n.output[0] for n in targets if n.op_type == "Conv"]))
    ranges = activation_ranges(model, names, feeds, offsets)

    new_nodes, counts, quantized = [], Counter(), {}
    for node in model.graph.node:
        if not const_weight(node):
            new_nodes.append(node)
            continue
        x, w, p = node.input[0], inits[node.input[1]], f"{node.name or node.output[0]}_w8a8"
        if x not in quantized:  # q/k/v projections read the same tensor: quantize it once
            xs, xz = _uint8_grid(*ranges[x], margin)
            quantized[x] = (f"{x}_u8", f"{x}_u8_scale", f"{x}_u8_zp")
            model.graph.initializer.extend([numpy_helper.from_array(xs, quantized[x][1]), numpy_helper.from_array(xz, quantized[x][2])])
            new_nodes.append(helper.make_node("QuantizeLinear", [x, *quantized[x][1:]], [quantized[x][0]], name=f"{x}_QuantizeLinear"))
        xq, xs_name, xz_name = quantized[x]
        conv = node.op_type == "Conv"
        q, scale = _symmetric_int8(numpy_helper.to_array(w), axis=0 if conv else 1)
        model.graph.initializer.extend([numpy_helper.from_array(q, f"{p}_w"), numpy_helper.from_array(scale, f"{p}_w_scale"),
                                        numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{p}_w_zp")])
        if not conv:
            new_nodes.append(helper.make_node("MatMulIntegerToFloat", [xq, f"{p}_w", xs_name, f"{p}_w_scale", xz_name, f"{p}_w_zp"],
                                              list(node.output), name=p, domain="com.microsoft"))
        else:
            ys, yz = _uint8_grid(*ranges[node.output[0]], margin)
            model.graph.initializer.extend([numpy_helper.from_array(ys, f"{p}_y_scale"), numpy_helper.from_array(yz, f"{p}_y_zp")])
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            out = f"{p}_nobias" if bias else node.output[0]
            new_nodes += [
                helper.make_node("QLinearConv", [xq, xs_name, xz_name, f"{p}_w", f"{p}_w_scale", f"{p}_w_zp", f"{p}_y_scale", f"{p}_y_zp"],
                                 [f"{p}_y"], name=p, **attrs),
                helper.make_node("DequantizeLinear", [f"{p}_y", f"{p}_y_scale", f"{p}_y_zp"], [out], name=f"{p}_DequantizeLinear"),
            ]
            if bias:  # in float: an int32 bias is only exact for one input scale, and ranges exclude it
                b = numpy_helper.to_array(inits[bias]).astype(np.float32)
                model.graph.initializer.append(numpy_helper.from_array(b.reshape(-1, *([1] * (len(w.dims) - 2))), f"{p}_bias"))
                new_nodes.append(helper.make_node("Add", [out, f"{p}_bias"], list(node.output), name=f"{p}_bias"))
        counts[node.op_type] += 1
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return replace_nodes(model, new_nodes), counts
