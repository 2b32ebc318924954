"""attn_jax.data: datasets -> static-shape batches for the training loop.

    from attn_jax import data
    cfg = data.default_config('copy')
    bundle = data.make_datasets(cfg, data_dir='/tmp/tfds', seed=0)
    batch = next(bundle.train)   # {'inputs': int32 [b, Ls], 'targets': int32 [b, Lt]}

Special ids (every tokenizer): pad=0, bos=1, eos=2, unk=3; real tokens start at 4.
Modules: tokenizers, algorithmic, listops, builders (local TFDS builders), local (user files),
named (named TFDS datasets), batching (grain stages), config, pipeline (make_datasets).
"""

from __future__ import annotations

from attn_jax.data.batching import (
    BATCHING_MODES,
    LengthPolicy,
    length_boundaries,
    segment_positions,
)
from attn_jax.data.config import DATASET_NAMES, default_config, task_of, validate_config
from attn_jax.data.named import NAMED_DATASETS
from attn_jax.data.pipeline import DataBundle, make_datasets
from attn_jax.data.tokenizers import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    ByteTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    WordTokenizer,
    decode_batch,
    load_tokenizer,
    save_tokenizer,
)

__all__ = [
    'BATCHING_MODES', 'BOS_ID', 'DATASET_NAMES', 'EOS_ID', 'NAMED_DATASETS', 'PAD_ID', 'UNK_ID',
    'ByteTokenizer', 'CharTokenizer', 'DataBundle', 'LengthPolicy', 'SentencePieceTokenizer',
    'WordTokenizer', 'decode_batch', 'default_config', 'length_boundaries', 'load_tokenizer',
    'make_datasets', 'save_tokenizer', 'segment_positions', 'task_of', 'validate_config',
]
