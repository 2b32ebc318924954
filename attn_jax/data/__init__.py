"""attn_jax.data: datasets -> static-shape batches for the training loop.

    from attn_jax import data
    cfg = data.default_config('copy')
    bundle = data.make_datasets(cfg, data_dir='/tmp/tfds', seed=0)
    batch = next(bundle.train)   # {'inputs': int32 [b, Ls], 'targets': int32 [b, Lt]}

Special ids (every tokenizer): pad=0, bos=1, eos=2, unk=3 (`attn_jax.tokens`); real tokens start
at 4. Modules: tokenizers, algorithmic, listops, builders (local TFDS builders), local (user
files), named (named TFDS datasets), batching (grain stages), config (JAX-free: the `data`
config section and its validation), pipeline (make_datasets). Names are exported lazily, so
`attn_jax.data.config` loads without grain or TFDS.
"""

from typing import TYPE_CHECKING

from attn_jax import _lazy

_EXPORTS = {
    'BATCHING_MODES': 'batching', 'LengthPolicy': 'batching', 'length_boundaries': 'batching',
    'segment_positions': 'batching',
    'DATASET_NAMES': 'config', 'default_config': 'config', 'task_of': 'config',
    'static_meta': 'config',
    'validate_config': 'config',
    'NAMED_DATASETS': 'named',
    'DataBundle': 'pipeline', 'make_datasets': 'pipeline',
    'BOS_ID': 'tokenizers', 'EOS_ID': 'tokenizers', 'PAD_ID': 'tokenizers', 'UNK_ID': 'tokenizers',
    'ByteTokenizer': 'tokenizers', 'CharTokenizer': 'tokenizers',
    'SentencePieceTokenizer': 'tokenizers', 'WordTokenizer': 'tokenizers',
    'decode_batch': 'tokenizers', 'load_tokenizer': 'tokenizers', 'save_tokenizer': 'tokenizers',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # Static analysers see the real names.
  from attn_jax.data.batching import (
      BATCHING_MODES,
      LengthPolicy,
      length_boundaries,
      segment_positions,
  )
  from attn_jax.data.config import (
      DATASET_NAMES,
      default_config,
      static_meta,
      task_of,
      validate_config,
  )
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
