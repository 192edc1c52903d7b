"""The export recipes as data: names, descriptions, session config, which passes run on which graph.

Plain data, importable without onnx or torch, so the device install can list recipes (CLI help,
`inspect`); export/quantize.py holds the passes that carry them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Session config every int8 bundle asks for. Without it ORT fuses DQ(int8 W) -> MatMul into
# MatMulNBits computing in int8 (accuracy level 4), which breaks ZO fidelity. Never set
# session.disable_quant_qdq: it would fold the weights back to fp32 in memory.
FLOAT_COMPUTE = {"session.qdq_matmulnbits_accuracy_level": "0"}
# Where a recipe stores MatMul weights as DequantizeLinear + MatMul (dequantized_matmuls): ORT's
# QDQ pass would fuse each pair back into MatMulNBits at load. The pass does nothing else to
# these bundles: their Conv/Gemm QDQ pairs have no QuantizeLinear, so no QDQ group to fuse.
KEEP_DEQUANTIZED = {"optimization.disable_specified_optimizers": "QDQSelectorActionTransformer"}


@dataclass(frozen=True)
class Recipe:
    """How one bundle kind is made; ``for_graph`` names the recipe of each graph."""

    name: str
    description: str
    session_config: dict = field(default_factory=dict)
    parity_tolerance: float = 0.1  # relative error vs torch fp32 allowed per graph output
    embeddings_dtype: str = "float16"
    experimental: bool = False
    targets: tuple[str, ...] = ("cpu", "cuda", "tensorrt")
    graphs: dict[str, str] = field(default_factory=dict)  # graph -> recipe, where it differs from this one
    calibrated: bool = False  # quantizing a graph this way needs calibration inputs
    winograd: tuple[str, ...] = ()  # graphs whose 3x3 convolutions become Winograd convolutions (export/winograd.py)
    shared_prefix: tuple[str, ...] = ()  # U-Nets that take one sample for a batch of conditions (export/prefix.py)
    int8_matmul: tuple[str, ...] = ()  # graphs whose MatMulNBits compute in int8, except the text condition's readers
    dequantized_matmul: tuple[str, ...] = ()  # graphs whose float-compute MatMulNBits become DequantizeLinear + MatMul
    scheme: str = ""  # the recipe whose weight quantization this one uses, where it is another's

    def for_graph(self, name: str) -> "Recipe":
        """The recipe that quantizes graph ``name`` in a bundle of this recipe."""
        return RECIPES[self.graphs.get(name, self.name)]


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        # Winograd in the U-Net only: it runs thousands of times; the VAE's 3x3 convolutions at
        # 128-512 px would hold Winograd-domain tensors of 0.1-0.3 GB for a one-off gain.
        Recipe("int8-cpu", "weight-only int8: block-wise int8 MatMul weights dequantized per run, per-channel QDQ for Conv/Gemm, "
               "U-Net 3x3 convolutions as Winograd F(4x4, 3x3) or F(2x2, 3x3), one U-Net sample per batch of conditions",
               {**FLOAT_COMPUTE, **KEEP_DEQUANTIZED}, targets=("cpu",), winograd=("unet",), shared_prefix=("unet",),
               dequantized_matmul=("text_encoder", "unet")),
        # int8 compute where ZO learning survived it on the toy world: not where the perturbed
        # condition enters the U-Net (cross-attention K/V), nor in the text encoder, which the
        # perturbed token passes through whole (docs/recipes.md).
        Recipe("int8-cpu-fast", "as int8-cpu, and the U-Net's MatMuls compute in int8 (inputs rounded per block of 32), "
               "except the cross-attention K/V projections",
               FLOAT_COMPUTE, targets=("cpu",), winograd=("unet",), shared_prefix=("unet",), int8_matmul=("unet",),
               scheme="int8-cpu"),
        Recipe("int8-gpu", "weight-only int8: per-channel symmetric QDQ on every MatMul/Gemm/Conv weight",
               FLOAT_COMPUTE, targets=("cuda", "tensorrt", "cpu")),
        Recipe("fp16", "float16 weights and activations, float32 inputs/outputs", parity_tolerance=0.02, targets=("cuda", "tensorrt")),
        Recipe("fp32", "the exported float32 graphs (reference)", parity_tolerance=1e-4, embeddings_dtype="float32"),
        Recipe("w8a8-dynamic", "EXPERIMENT: ORT dynamic quantization, uint8 activations (fails the ZO fidelity gate)",
               parity_tolerance=0.3, experimental=True, targets=("cpu",)),
        Recipe("w8a8-static", "EXPERIMENT: int8 compute in the U-Net on calibrated uint8 activation grids (fails the ZO fidelity gate)",
               FLOAT_COMPUTE, parity_tolerance=0.3, experimental=True, targets=("cpu",), calibrated=True,
               graphs={"text_encoder": "int8-cpu", "vae_encoder": "int8-cpu", "vae_decoder": "int8-cpu"}),
    )
}
DEFAULT_RECIPE = "int8-cpu"


def recipe_choices() -> str:
    """``int8-cpu | ... | fp32 | w8a8-dynamic, w8a8-static (experiments)``, for help texts."""
    plain = [r.name for r in RECIPES.values() if not r.experimental]
    trials = [r.name for r in RECIPES.values() if r.experimental]
    return " | ".join(plain) + (f" | {', '.join(trials)} (experiments)" if trials else "")
