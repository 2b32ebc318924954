"""Pure functional attention ops: no Flax, no state, no I/O.

    from attn_jax import ops
    out = ops.dot_product_attention(q, k, v, is_causal=True)

    # Open attention: your own mask and score functions, block-sparse, trainable.
    doc = ops.mask_mods.document(doc_ids)
    bm = ops.block_mask(ops.and_masks(ops.mask_mods.causal(), doc), batch=b, heads=h, q_len=t)
    out = ops.dot_product_attention(q, k, v, block_mask=bm,
                                    score_mod=ops.score_mods.soft_cap(50.0))
    # The same, fused (Pallas: Triton on GPU, Mosaic on TPU; interpreted on CPU).
    out = ops.dot_product_attention(q, k, v, block_mask=bm, implementation='pallas')

    # Variants with the same signature: linear-time baselines, Reformer's shared QK, and
    # attention summed over queries instead of keys (values [b, q_len, heads, d]).
    out = ops.linear_attention(q, k, v, is_causal=True)
    w = ops.performer_projection(jax.random.key(0), 64, q.shape[-1])
    out = ops.performer_attention(q, k, v, projection=w, is_causal=True)
    out = ops.shared_qk_attention(q, v, is_causal=True)
    per_key = ops.backward_aggregation(q, k, values)

    # Long context: one sequence split over a 'sequence' mesh axis (ring or all-gather), and
    # RoPE scaled past the training length.
    x = ops.sequence_layout.to_layout(x, devices=4, layout='zigzag')  # balanced for causal
    out = ops.sequence_sharded_attention(q, k, v, mesh=mesh, layout='zigzag', is_causal=True)
    q = ops.rope(q, positions, scaling=ops.RopeScaling('yarn', 4.0, original_max_position=4096))
    # Images: patches, 2-D positions, attention maps over the patch grid.
    x = ops.patchify(images, 4)                              # [b, patches, 4 * 4 * C]
    q = ops.rope_2d(q, ops.grid_positions(grid_h, grid_w))   # axial RoPE on (row, column)
    m = ops.patch_attention(weights, grid=(grid_h, grid_w), cls_token=True)  # rollout
"""

from attn_jax.ops import kernels, mask_mods, score_mods, sequence_layout
from attn_jax.ops.aggregation import backward_aggregation
from attn_jax.ops.attention import (
    BLOCKWISE_MIN_LOGITS,
    choose_implementation,
    dot_product_attention,
    fused_attention,
    merge_attention,
)
from attn_jax.ops.block_mask import BlockMask, block_mask
from attn_jax.ops.blockwise import blockwise_attention
from attn_jax.ops.context_parallel import (
    choose_strategy,
    context_parallel_attention,
    sequence_sharded_attention,
)
from attn_jax.ops.dense import dense_attention, masked_softmax
from attn_jax.ops.dropout import dropout, dropout_mask, keep_probability
from attn_jax.ops.geometric import concat_geometric, geometric_positions
from attn_jax.ops.heads import merge_heads, num_groups, repeat_kv, split_heads
from attn_jax.ops.kernels import pallas_attention
from attn_jax.ops.linear import (
    elu_features,
    kernel_attention,
    linear_attention,
    performer_attention,
    performer_features,
    performer_projection,
)
from attn_jax.ops.masks import (
    causal_mask,
    combine_masks,
    local_mask,
    mask_to_bias,
    padding_mask,
    query_key_mask,
    segment_mask,
    valid_positions,
)
from attn_jax.ops.mods import and_masks, or_masks
from attn_jax.ops.patches import attention_rollout, patch_attention, patchify
from attn_jax.ops.positional import (
    add_sinusoidal,
    alibi_bias,
    alibi_slopes,
    learned_positional,
    learned_positional_init,
    relative_position_bias,
    relative_position_buckets,
    sinusoidal,
)
from attn_jax.ops.positional_2d import grid_positions, rope_2d, sinusoidal_2d
from attn_jax.ops.prefix import prefix_attention
from attn_jax.ops.rope import (
    SCALING_KINDS,
    RopeScaling,
    apply_rotary,
    rope,
    rope_attention_factor,
    rope_frequencies,
)
from attn_jax.ops.scores import additive_scores, dot_scores, general_scores, scaled_dot_scores
from attn_jax.ops.shared_qk import exclude_self, l2_normalize, shared_qk_attention
from attn_jax.ops.talking_heads import talking_heads_attention
from attn_jax.ops.token_chunks import map_valid_chunks, valid_first_order

__all__ = [
    'BLOCKWISE_MIN_LOGITS', 'SCALING_KINDS', 'RopeScaling', 'add_sinusoidal', 'additive_scores',
    'alibi_bias', 'alibi_slopes', 'apply_rotary',
    'and_masks', 'backward_aggregation', 'block_mask', 'BlockMask', 'blockwise_attention',
    'causal_mask', 'choose_implementation', 'choose_strategy', 'combine_masks', 'concat_geometric',
    'context_parallel_attention',
    'dense_attention', 'dot_product_attention', 'dot_scores', 'dropout', 'dropout_mask',
    'elu_features', 'exclude_self', 'fused_attention', 'general_scores', 'geometric_positions',
    'keep_probability', 'kernel_attention', 'kernels',
    'l2_normalize', 'learned_positional', 'learned_positional_init', 'linear_attention',
    'local_mask', 'map_valid_chunks', 'mask_mods', 'mask_to_bias', 'masked_softmax',
    'merge_attention',
    'merge_heads', 'num_groups', 'or_masks', 'padding_mask', 'pallas_attention',
    'performer_attention',
    'performer_features', 'performer_projection', 'prefix_attention', 'query_key_mask',
    'relative_position_bias', 'relative_position_buckets', 'repeat_kv', 'rope',
    'rope_attention_factor', 'rope_frequencies',
    'scaled_dot_scores', 'score_mods',
    'segment_mask', 'sequence_layout', 'sequence_sharded_attention', 'shared_qk_attention',
    'sinusoidal', 'split_heads', 'talking_heads_attention', 'valid_first_order',
    'valid_positions',
    'attention_rollout', 'grid_positions', 'patch_attention', 'patchify', 'rope_2d',
    'sinusoidal_2d',
]
