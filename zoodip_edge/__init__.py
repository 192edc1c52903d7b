"""zoodip-edge: backpropagation-free personalization of INT8 Stable Diffusion on devices.

Importing this package (or ``zoodip_edge.runtime``) never imports torch, diffusers or
transformers; only ``zoodip_edge.export`` does.
"""

# The one place the version is written: pyproject.toml reads it from here. A version per behaviour
# change; exports record it in the manifest (created.tool) and CHANGELOG.md heads its entries.
__version__ = "0.14.0"
