"""zoodip-edge: backpropagation-free personalization of INT8 Stable Diffusion on devices.

Importing this package (or ``zoodip_edge.runtime``) never imports torch, diffusers or
transformers; only ``zoodip_edge.export`` does.
"""

__version__ = "0.1.0"
