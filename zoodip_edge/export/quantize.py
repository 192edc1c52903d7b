"""Export recipes: how each graph's weights are stored, and what ORT must be told to load them.

Weights only, never activations: ZOODiP reads loss differences of order mu * grad, and
int8 activations turn the loss into a step function of the token (docs/recipes.md).

- ``int8-gpu``: every Linear/Conv weight as per-channel symmetric int8 + DequantizeLinear
  (explicit QDQ, weight-only). CUDA EP keeps int8 weights and computes in float; TensorRT EP
  reads the QDQ directly. No QOperator ops, which CUDA EP would run on the CPU.
- ``int8-cpu``: MatMul weights as MatMulNBits (bits=8, float compute); Conv/Gemm weights as
  in ``int8-gpu``. MatMulNBits dequantizes per block inside the kernel, so no fp32 copy
  of a MatMul weight is ever made.
- ``fp16``: float16 weights and activations, float32 graph inputs/outputs (GPU targets).
- ``fp32``: the exported graph unchanged (reference; parity within 1e-4).
- ``w8a8-dynamic``: EXPERIMENT. ORT dynamic quantization (uint8 activations). The ZO
  fidelity gate refuses it unless ``--allow-unfaithful``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Session config every int8 bundle asks for. Without it ORT fuses DQ(int8 W) -> MatMul into
# MatMulNBits computing in int8 (accuracy level 4), which breaks ZO fidelity. Never set
# session.disable_quant_qdq: it would fold the weights back to fp32 in memory.
FLOAT_COMPUTE = {"session.qdq_matmulnbits_accuracy_level": "0"}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    session_config: dict = field(default_factory=dict)
    parity_tolerance: float = 0.1  # relative error vs torch fp32 allowed per graph output
    embeddings_dtype: str = "float16"
    experimental: bool = False
    targets: tuple[str, ...] = ("cpu", "cuda", "tensorrt")


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("int8-cpu", "weight-only int8: MatMulNBits-8 (float compute) for MatMul, per-channel QDQ for Conv/Gemm",
               FLOAT_COMPUTE, targets=("cpu",)),
        Recipe("int8-gpu", "weight-only int8: per-channel symmetric QDQ on every MatMul/Gemm/Conv weight",
               FLOAT_COMPUTE, targets=("cuda", "tensorrt", "cpu")),
        Recipe("fp16", "float16 weights and activations, float32 inputs/outputs", parity_tolerance=0.02, targets=("cuda", "tensorrt")),
        Recipe("fp32", "the exported float32 graphs (reference)", parity_tolerance=1e-4, embeddings_dtype="float32"),
        Recipe("w8a8-dynamic", "EXPERIMENT: ORT dynamic quantization, uint8 activations (fails the ZO fidelity gate)",
               parity_tolerance=0.3, experimental=True, targets=("cpu",)),
    )
}
DEFAULT_RECIPE = "int8-cpu"


def quantize(model: onnx.ModelProto, recipe: str) -> tuple[onnx.ModelProto, dict]:
    """Apply a recipe to one graph; returns the new model and a summary of what changed."""
    if recipe == "fp32":
        return model, {"weights": _weight_dtypes(model)}
    if recipe == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
        return model, {"weights": _weight_dtypes(model)}
    if recipe == "int8-gpu":
        model, counts = weight_only_qdq(model, ("MatMul", "Gemm", "Conv"))
    elif recipe == "int8-cpu":
        model, counts = matmul_nbits8(model)
        model, more = weight_only_qdq(model, ("Gemm", "Conv"))
        counts.update(more)
    elif recipe == "w8a8-dynamic":
        model, counts = dynamic_w8a8(model)
    else:
        raise ValueError(f"unknown recipe {recipe!r}")
    return model, {"quantized_ops": dict(counts), "weights": _weight_dtypes(model)}


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
                q, scale = _symmetric_int8(numpy_helper.to_array(init), axis)
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
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model, counts


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
