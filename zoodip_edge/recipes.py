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
# Where a recipe stores MatMul weights as block-wise DequantizeLinear + MatMul (pass
# block_int8_matmuls): ORT's QDQ pass would fuse each pair into MatMulNBits at load. The pass does
# nothing else to these bundles: their Conv/Gemm QDQ pairs have no QuantizeLinear, so no QDQ group to fuse.
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
    # graph -> the passes (names in export/quantize.py PASSES) that make it, in order; "*": any other graph
    passes: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def for_graph(self, name: str) -> "Recipe":
        """The recipe that quantizes graph ``name`` in a bundle of this recipe."""
        return RECIPES[self.graphs.get(name, self.name)]

    def passes_for(self, graph: str) -> tuple[str, ...]:
        """The passes this recipe runs on graph ``graph``, in order."""
        return self.passes.get(graph, self.passes.get("*", ()))


# The passes (export/quantize.py) each graph of a recipe goes through, in order. Weights first: the
# rewrites after them (Winograd, shared prefix) work on the quantized graph, and Winograd's own
# MatMuls multiply by constant transforms that stay float.
_INT8_CPU = ("split_projections", "block_int8_matmuls", "channel_int8_gemm_conv")  # split before quantizing: one weight per part
_INT8_CPU_FAST = ("split_projections", "matmulnbits_int8", "channel_int8_gemm_conv")
# Winograd in the U-Net only: it runs thousands of times; the VAE's 3x3 convolutions at 128-512 px
# would hold Winograd-domain tensors of 0.1-0.3 GB for a one-off gain.
_UNET_CPU = ("winograd_convs", "shared_prefix")


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("int8-cpu", "weight-only int8: block-wise int8 MatMul weights dequantized per run, per-channel QDQ for Conv/Gemm, "
               "U-Net 3x3 convolutions as Winograd F(4x4, 3x3) or F(2x2, 3x3), one U-Net sample per batch of conditions",
               {**FLOAT_COMPUTE, **KEEP_DEQUANTIZED}, targets=("cpu",),
               passes={"unet": (*_INT8_CPU, *_UNET_CPU), "*": _INT8_CPU}),
        # int8 compute where ZO learning survived it on the toy world: not where the perturbed
        # condition enters the U-Net (cross-attention K/V), nor in the text encoder, which the
        # perturbed token passes through whole (docs/recipes.md). MatMulNBits: the int8 compute is that op's.
        Recipe("int8-cpu-fast", "as int8-cpu, and the U-Net's MatMuls compute in int8 (inputs rounded per block of 32), "
               "except the cross-attention K/V projections",
               FLOAT_COMPUTE, targets=("cpu",),
               passes={"unet": (*_INT8_CPU_FAST, *_UNET_CPU, "int8_compute_matmuls"), "*": _INT8_CPU_FAST}),
        Recipe("int8-gpu", "weight-only int8: per-channel symmetric QDQ on every MatMul/Gemm/Conv weight",
               FLOAT_COMPUTE, targets=("cuda", "tensorrt", "cpu"), passes={"*": ("channel_int8_weights",)}),
        # The VAE stays float32: SDXL's overflows in float16 (diffusers upcasts it, its config's
        # force_upcast); it runs once per photo or image, so float16 would buy little there.
        Recipe("fp16", "float16 weights and activations in the text encoders and U-Net, float32 inputs/outputs; "
               "the VAE stays float32 (SDXL's overflows in float16)", parity_tolerance=0.02, targets=("cuda", "tensorrt"),
               graphs={"vae_encoder": "fp32", "vae_decoder": "fp32"}, passes={"*": ("float16",)}),
        Recipe("fp32", "the exported float32 graphs (reference)", parity_tolerance=1e-4, embeddings_dtype="float32"),
        Recipe("w8a8-dynamic", "EXPERIMENT: ORT dynamic quantization, uint8 activations (fails the ZO fidelity gate)",
               parity_tolerance=0.3, experimental=True, targets=("cpu",), passes={"*": ("dynamic_w8a8",)}),
        Recipe("w8a8-static", "EXPERIMENT: int8 compute in the U-Net on calibrated uint8 activation grids (fails the ZO fidelity gate)",
               FLOAT_COMPUTE, parity_tolerance=0.3, experimental=True, targets=("cpu",), calibrated=True,
               graphs={"text_encoder": "int8-cpu", "vae_encoder": "int8-cpu", "vae_decoder": "int8-cpu"},
               passes={"*": ("static_w8a8",)}),
    )
}
DEFAULT_RECIPE = "int8-cpu"


def recipe_choices() -> str:
    """``int8-cpu | ... | fp32 | w8a8-dynamic, w8a8-static (experiments)``, for help texts."""
    plain = [r.name for r in RECIPES.values() if not r.experimental]
    trials = [r.name for r in RECIPES.values() if r.experimental]
    return " | ".join(plain) + (f" | {', '.join(trials)} (experiments)" if trials else "")
