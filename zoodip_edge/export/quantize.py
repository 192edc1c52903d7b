"""Export recipes: how each graph's weights are stored, and what ORT must be told to load them.

A recipe is a list of passes per graph (``Recipe.passes``, zoodip_edge/recipes.py), each one in
``PASSES`` below, run in that order by ``quantize``.

Weights only, with one measured exception: ZOODiP reads loss differences of order mu * grad,
and int8 activations on per-tensor grids turn the loss into a step function of the token
(docs/recipes.md). ``int8-cpu-fast`` rounds MatMul inputs per block of 32, and not where the
perturbed condition enters; its learning is checked on the toy world.

- ``int8-gpu``: every Linear/Conv weight as per-channel symmetric int8 + DequantizeLinear
  (explicit QDQ, weight-only). CUDA EP keeps int8 weights and computes in float; TensorRT EP
  reads the QDQ directly. No QOperator ops, which CUDA EP would run on the CPU.
- ``int8-cpu``: MatMul weights as symmetric int8 in blocks of 32 along K, quantized here with
  ORT's 8-bit MatMulNBits rule (blockwise_int8) and stored as block-wise DequantizeLinear + MatMul
  (every graph): each run dequantizes a weight whole for a plain float GEMM, faster than
  MatMulNBits' float path (block_int8_matmuls). Conv/Gemm weights as in ``int8-gpu``. A projection
  that is only split (GEGLU) becomes one per part (projections.py), the U-Net's 3x3 convolutions
  Winograd convolutions (winograd.py), and the U-Net takes one sample for a batch of text
  conditions (prefix.py).
- ``int8-cpu-fast``: as ``int8-cpu``, but MatMul weights as MatMulNBits (ORT's quantizer, bits=8,
  blocks of 32: the same int8 values), whose U-Net MatMuls compute in int8 (accuracy level 4),
  except the cross-attention K/V projections, which read ``encoder_hidden_states``.
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
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

# The recipe table is plain data (zoodip_edge/recipes.py), so the CLI lists it without onnx.
from ..recipes import DEFAULT_RECIPE, FLOAT_COMPUTE, KEEP_DEQUANTIZED, RECIPES, Recipe  # noqa: F401
from .graph_ops import replace_nodes, weight, weights_first
from .prefix import CONDITION, broadcast_sample  # CONDITION: where the perturbed token enters the U-Net


def quantize(model: onnx.ModelProto, recipe: str, calibration: list[dict[str, np.ndarray]] | None = None,
             graph: str = "") -> tuple[onnx.ModelProto, dict]:
    """Run a recipe's passes for one graph, in order; returns the new model and a summary of what changed.

    ``calibration``: input feeds, for a recipe with ``Recipe.calibrated``. ``graph``: the
    graph's name in the bundle (``unet``, ...), which picks its list in ``Recipe.passes``.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}")
    if RECIPES[recipe].calibrated and not calibration:
        raise ValueError(f"recipe {recipe} needs calibration inputs")
    counts: Counter | None = None
    info: dict = {}
    for name in RECIPES[recipe].passes_for(graph):
        model, quantized, more = PASSES[name](model, calibration)
        if quantized is not None:
            counts = Counter() if counts is None else counts
            counts.update(quantized)  # update, not +: keeps a zero count ("MatMul": 0), as manifests always did
        info.update(more)
    model, info["weights_first"] = weights_first(model)  # every recipe: where ORT dequantizes, not what
    head = {"quantized_ops": dict(counts)} if counts is not None else {}
    return model, {**head, **info, "weights": _weight_dtypes(model)}


# The passes that read weights only through graph_ops.weight, so that a graph can go through them
# with its large weights still on disk (graph_ops.load_lazily); any other pass gets the graph whole.
LAZY_PASSES = frozenset({"split_projections", "block_int8_matmuls", "channel_int8_gemm_conv", "channel_int8_weights",
                         "winograd_convs", "shared_prefix"})

# A pass: (model, calibration feeds) -> (model, quantized op counts or None, what goes in the manifest).
Pass = Callable[[onnx.ModelProto, list | None], tuple[onnx.ModelProto, Counter | None, dict]]
PASSES: dict[str, Pass] = {}


def _pass(name: str) -> Callable[[Pass], Pass]:
    def register(fn: Pass) -> Pass:
        PASSES[name] = fn
        return fn
    return register


@_pass("split_projections")
def _split_projections(model, feeds):
    from .projections import split_projections

    model, n = split_projections(model)
    return model, None, {"split_projections": n}


@_pass("block_int8_matmuls")
def _block_int8_matmuls(model, feeds):
    model, n = block_int8_matmuls(model)
    return model, Counter({"MatMul": n}), {"dequantized_matmuls": n}


@_pass("matmulnbits_int8")
def _matmulnbits_int8(model, feeds):
    return (*matmul_nbits8(model), {})


@_pass("channel_int8_gemm_conv")
def _channel_int8_gemm_conv(model, feeds):
    return (*weight_only_qdq(model, ("Gemm", "Conv")), {})


@_pass("channel_int8_weights")
def _channel_int8_weights(model, feeds):
    return (*weight_only_qdq(model, ("MatMul", "Gemm", "Conv")), {})


@_pass("winograd_convs")
def _winograd_convs(model, feeds):
    from .winograd import winograd_convs

    model, wino = winograd_convs(model)
    return model, None, {"winograd_convs": dict(wino)}


@_pass("shared_prefix")
def _shared_prefix(model, feeds):
    model, n = broadcast_sample(model)
    return model, None, {"shared_prefix_nodes": n}


@_pass("int8_compute_matmuls")
def _int8_compute_matmuls(model, feeds):
    model, n = int8_matmul_compute(model)
    return model, None, {"int8_matmul": n}


@_pass("float16")
def _float16(model, feeds):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    return unique_node_names(drop_repeated_nodes(model)), None, {}


@_pass("dynamic_w8a8")
def _dynamic_w8a8(model, feeds):
    return (*dynamic_w8a8(model), {})


@_pass("static_w8a8")
def _static_w8a8(model, feeds):
    # encoder_hidden_states: one token's row moves by mu there; a per-tensor grid would erase it
    model, counts = static_w8a8(model, feeds, keep_float=(CONDITION,))
    model, rest = weight_only_qdq(model, ("MatMul", "Gemm", "Conv"))
    counts.update({f"{k} (weight-only)": v for k, v in rest.items()})
    return model, counts, {}


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
    new_nodes, counts = [], Counter()
    for node in model.graph.node:
        name = node.input[1] if node.op_type in op_types and len(node.input) > 1 else None
        init = inits.get(name) if name else None
        if init is not None and init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 2:
            if name not in done:
                axis = _weight_axis(node)
                q, scale = _symmetric_int8(weight(init), axis)
                qname, sname, zname = f"{name}_int8", f"{name}_scale", f"{name}_zp"
                model.graph.initializer.extend([
                    numpy_helper.from_array(q, qname),
                    numpy_helper.from_array(scale, sname),
                    numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), zname),
                ])
                done[name] = f"{name}_dq"
                new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname, zname], [done[name]],
                                                 name=f"{name}_DequantizeLinear", axis=axis))
            node.input[1] = done[name]
            counts[node.op_type] += 1
        new_nodes.append(node)
    # quantize() lists the DequantizeLinear nodes first (graph_ops.weights_first), so that each runs
    # right before its consumer
    return replace_nodes(model, new_nodes), counts


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


def blockwise_int8(w: np.ndarray, block_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A [K, N] float32 weight as symmetric int8 in blocks of ``block_size`` along K: int8 [K, N]
    and float32 scales [ceil(K / block_size), N], with ``w ~= q * scale`` per block.

    ORT's 8-bit MatMulNBits rule, to the bit (MLAS ``BlockwiseQuantizer``, which
    ``MatMulNBitsQuantizer`` calls), so that bundles keep the numbers they had when ORT's quantizer
    made them: the block's value of largest magnitude ``m`` (the negative one on a tie) gives
    ``scale = -m / 128``, so ``m`` itself is -128 and the grid uses all of [-128, 127]; each value is
    ``v * (1 / scale) + 128`` in float32, rounded with halves up (C ``roundf`` of a value that is
    never negative), clamped to [0, 255], minus 128.
    A block of zeros takes the sign of its first zero for its (zero) scale, and 0 for every value.
    """
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    blocks = -(-k // block_size)
    pad = blocks * block_size - k
    if pad:  # a partial last block: repeat one of its own rows, which moves neither its max nor its min
        w = np.concatenate([w, np.repeat(w[(blocks - 1) * block_size:][:1], pad, axis=0)])
    b = w.reshape(blocks, block_size, n)
    hi, lo = b.max(axis=1), b.min(axis=1)
    m = np.where(np.abs(hi) > np.abs(lo), hi, lo)
    m = np.where(m == 0, b[:, 0], m)  # MLAS starts min and max at the first value: -0.0 stays -0.0
    scale = (-m / np.float32(128)).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # blocks of subnormal weights, as in MLAS
        recip = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)
        x = (b * recip[:, None, :]).astype(np.float32) + np.float32(128)  # two float32 roundings, as in C
        t = np.trunc(x)
        r = t + np.where(np.abs(x - t) >= 0.5, np.sign(x), 0).astype(np.float32)  # roundf: halves away from 0
        q = (np.clip(r, 0, 255).astype(np.int16) - 128).astype(np.int8)
    return np.ascontiguousarray(q.reshape(-1, n)[:k]), scale


def block_int8_matmuls(model: onnx.ModelProto, block_size: int = 32) -> tuple[onnx.ModelProto, int]:
    """Each MatMul whose weight is a float32 initializer [K, N] reads it through a block-wise
    ``DequantizeLinear`` (int8 [K, N], scales [K / block_size, N], axis 0, no zero point; opset 21);
    returns the model and how many MatMuls changed. The int8 values are ``blockwise_int8``'s.

    Each run dequantizes a weight whole (a transient float copy, at most 26 MB in SD1.5) and a
    plain float GEMM multiplies it: ORT's MatMulNBits float path took 1.2-2.2x a float MatMul's
    time at a batched step's sizes on an AVX2 CPU (benchmarks/experiments/matmul_forms.py --batch 3);
    the SD1.5 U-Net forward 0.93x as long for +32 MB (docs/recipes.md). Needs KEEP_DEQUANTIZED in
    the bundle's session config, or ORT fuses each pair into MatMulNBits at load.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 21:
        raise ValueError(f"block-wise DequantizeLinear needs opset 21 or later, the model has {opset}")
    inits = {i.name: i for i in model.graph.initializer}
    done: dict[str, str] = {}  # weight -> its dequantized tensor
    nodes, count = [], 0
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if w is not None and w.data_type == onnx.TensorProto.FLOAT and len(w.dims) == 2:
            if w.name not in done:
                q, scale = blockwise_int8(weight(w), block_size)
                p = (node.name or node.output[0]) + ".dq"
                model.graph.initializer.extend([numpy_helper.from_array(q, f"{p}.weight_int8"),
                                                numpy_helper.from_array(scale, f"{p}.weight_scale")])
                # listed with its MatMul here; quantize() then lists it first (graph_ops.weights_first)
                nodes.append(helper.make_node("DequantizeLinear", [f"{p}.weight_int8", f"{p}.weight_scale"], [f"{p}.weight"],
                                              name=p, axis=0, block_size=block_size))
                done[w.name] = f"{p}.weight"
            node.input[1] = done[w.name]
            count += 1
        nodes.append(node)
    if count:
        replace_nodes(model, nodes)  # drops the float weights
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
    offsets = {n.output[0]: weight(inits[n.input[2]]) for n in targets
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
        q, scale = _symmetric_int8(weight(w), axis=0 if conv else 1)
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
                b = weight(inits[bias]).astype(np.float32)
                model.graph.initializer.append(numpy_helper.from_array(b.reshape(-1, *([1] * (len(w.dims) - 2))), f"{p}_bias"))
                new_nodes.append(helper.make_node("Add", [out, f"{p}_bias"], list(node.output), name=f"{p}_bias"))
        counts[node.op_type] += 1
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return replace_nodes(model, new_nodes), counts
