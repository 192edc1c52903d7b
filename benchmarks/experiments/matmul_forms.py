"""One SD1.5-sized MatMul in each weight-only int8 form ORT's CPU EP can run (what dequantization costs).

    python -m benchmarks.experiments.matmul_forms [--repeat 7] [--batch 1]

Forms, at the U-Net's token counts (64² = 4096 ... 16² = 256 tokens) and its projection shapes:
- fp32 ``MatMul`` (constant fp32 weight: the speed float compute can reach, at 4x the weight memory);
- ``MatMulNBits`` bits 8, block 32, accuracy level 0 (float compute): what int8-cpu bundles hold;
- ``DequantizeLinear`` (per-channel int8) + ``MatMul``, as int8-gpu bundles hold it. ORT fuses this
  into ``MatMulNBits`` at load time; with the session config
  ``optimization.disable_specified_optimizers = QDQSelectorActionTransformer`` it stays DQ + MatMul
  (the optimized graph's op types are printed to show which ran).
ORT CPU EP, 2 intra-op threads, ``session.qdq_matmulnbits_accuracy_level = 0`` as bundles set it;
3 warm-up runs, median of ``--repeat``. ``--batch 3`` multiplies the tokens as a batched ZO step does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from benchmarks.common import header, median_s

# (tokens, K, N): self-attention projections and GEGLU feed-forward in/out per U-Net level.
SHAPES = ((4096, 320, 320), (4096, 320, 2560), (4096, 1280, 320), (1024, 640, 5120), (1024, 2560, 640),
          (256, 1280, 10240), (256, 5120, 1280))
FORMS = ("fp32 MatMul", "MatMulNBits acc 0", "DQ + MatMul (fused by ORT)", "DQ + MatMul, QDQ fusion off")


def graph(tokens: int, k: int, n: int, form: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, n])
    if form.startswith("DQ"):
        scale = (np.abs(w).max(0) / 127).astype(np.float32)
        wq = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        nodes = [helper.make_node("DequantizeLinear", ["wq", "scale"], ["w"], axis=1), helper.make_node("MatMul", ["x", "w"], ["y"])]
        inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(scale, "scale")]
    else:
        nodes, inits = [helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 21)])
    if form.startswith("MatMulNBits"):
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=8,
                                                                                  accuracy_level=0))
        q.process()
        model = q.model.model
    return model


def timed(model: onnx.ModelProto, form: str, x: np.ndarray, repeat: int) -> tuple[float, str]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if form.endswith("fusion off"):
        so.add_session_config_entry("optimization.disable_specified_optimizers", "QDQSelectorActionTransformer")
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ops = "+".join(sorted({node.op_type for node in onnx.load(so.optimized_model_filepath).graph.node}))
    return 1e3 * median_s(lambda: sess.run(None, {"x": x}), repeat, warmup=3), ops


ap = argparse.ArgumentParser()
ap.add_argument("--repeat", type=int, default=7)
ap.add_argument("--batch", type=int, default=1, help="images per MatMul (the n + 1 of a batched step)")
a = ap.parse_args()
rows = ["| tokens × K × N | " + " | ".join(FORMS) + " | MatMulNBits / fp32 |", "|---" * (len(FORMS) + 2) + "|"]
for tokens, k, n in ((t * a.batch, k, n) for t, k, n in SHAPES):
    x = np.random.default_rng(1).standard_normal((1, tokens, k)).astype(np.float32)
    cells = [timed(graph(tokens, k, n, f), f, x, a.repeat) for f in FORMS]
    rows.append(f"| {tokens} × {k} × {n} | " + " | ".join(f"{ms:.1f} ms ({ops})" for ms, ops in cells)
                + f" | {cells[1][0] / cells[0][0]:.2f}× |")
    print(rows[-1], flush=True)
print(header(sys.argv) + "\n" + "\n".join(rows))
