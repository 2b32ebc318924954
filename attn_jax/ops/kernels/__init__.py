"""Fused Pallas attention kernels behind `ops.dot_product_attention(..., implementation='pallas')`.

    blocks.py     block sizes (one table per platform and dtype) and each platform's rules
    mod_eval.py   mask/score functions split into kernel inputs and in-kernel code
    common.py     the static plan of a call and the tile code both platforms share
    gpu_flash.py  Triton forward, dK/dV and dQ kernels (visit lists walked in-kernel)
    tpu_flash.py  Mosaic forward, dK/dV and dQ kernels (visit lists as scalar prefetch)
    flash.py      the entry point: normalisation, custom VJP, platform choice at lowering
"""

from attn_jax.ops.kernels.blocks import TILES, VISIT_BLOCK
from attn_jax.ops.kernels.flash import pallas_attention, unsupported_reason

__all__ = ['TILES', 'VISIT_BLOCK', 'pallas_attention', 'unsupported_reason']
