"""The data config: every field documented, defaults per dataset, validated before any work.

    cfg = default_config('listops')           # or 'copy', 'addition', 'imdb_reviews', 'local', ...
    cfg.listops.num_train = 2000              # unknown fields raise (the config is locked)
    validate_config(cfg)                      # make_datasets() calls this first

Importing this module loads no JAX, grain or TFDS (experiment config files build their `data`
section from it); `validate_config` imports the modules whose rules it checks when called.
"""

from __future__ import annotations

import ml_collections

from attn_jax.data import algorithmic, formats, images, named

GENERATED = algorithmic.ALGORITHMIC_TASKS + ('listops',)
DATASET_NAMES = GENERATED + ('local',) + named.NAMED_DATASETS + images.IMAGE_DATASETS


def default_config(name: str = 'listops') -> ml_collections.ConfigDict:
  """A locked ConfigDict for dataset `name` (see DATASET_NAMES; any wmtNN_translate/xx-yy too)."""
  if name not in DATASET_NAMES and not named.is_named(name):
    raise ValueError(f'Unknown dataset {name!r}; allowed: {DATASET_NAMES}.')
  c = ml_collections.ConfigDict()
  # Dataset: a generated task, 'local' (your files, see `local`), or a named TFDS dataset.
  c.name = name
  # Seed of dataset *content* (generated examples, fraction splits); the `seed` argument of
  # make_datasets only drives shuffling, so runs with different seeds see the same data.
  c.data_seed = 0

  # Generated algorithmic tasks (copy/reverse/sort/addition). Lengths are inclusive ranges of
  # symbols (digits per operand for addition); test uses the longer range.
  c.algorithmic = ml_collections.ConfigDict(dict(
      num_symbols=10, train_length=(1, 20), test_length=(21, 40),
      num_train=50_000, num_validation=1_000, num_test=1_000))
  if name == 'addition':
    c.algorithmic.train_length, c.algorithmic.test_length = (1, 8), (9, 16)

  # ListOps (LRA recipe); length counts operator, digit and ']' tokens.
  c.listops = ml_collections.ConfigDict(dict(
      length=(500, 2000), max_depth=10, max_args=10, operator_prob=0.25,
      num_train=96_000, num_validation=2_000, num_test=2_000))

  # The user's files (name='local'); see attn_jax.data.local for the formats.
  c.local = ml_collections.ConfigDict(dict(
      task='classification', train='', validation='', test='',
      source_suffix='', target_suffix='', text_field='text', label_field='label',
      lm_documents='line', on_bad_line='error', validation_fraction=0.0, test_fraction=0.0))

  # Image datasets (digits, mnist, cifar10; see attn_jax.data.images): training augmentation
  # '' (the dataset's: 'crop_flip' for cifar10, else 'none') | 'none' | 'crop' | 'crop_flip',
  # and the black border (pixels per side) a random crop is taken from.
  c.image = ml_collections.ConfigDict(dict(augment='', crop_padding=4))

  # Named TFDS datasets (and the image datasets): translation direction and split overrides
  # ('' = dataset default).
  c.tfds = ml_collections.ConfigDict(dict(
      reverse_translation=False, train_split='', eval_splits=''))

  # Tokenizer. kind: '' = the dataset's default (word for generated tasks, sentencepiece for
  # translation and lm1b, char for tiny_shakespeare, byte for classification);
  # 'byte' | 'char' | 'sentencepiece' otherwise. path: an existing tokenizer file (a run's
  # saved one) to reuse instead of training; joint: one model for source and target.
  c.tokenizer = ml_collections.ConfigDict(dict(
      kind='', vocab_size=8_000, model_type='unigram', joint=True, path='', target_path='',
      max_train_examples=200_000, char_max_vocab=0))

  # Lengths in tokens including EOS. 0 for max_target_length = same as max_length.
  c.max_length = 2048 if name == 'listops' else 256
  c.max_target_length = 0
  c.length_policy = 'truncate'      # 'truncate' (keeps a final EOS) or 'filter'; both counted
  c.eval_length_policy = 'truncate'

  # Batching. batch_size is global (split over processes); see attn_jax.data.batching.
  c.batch_size = 32
  c.eval_batch_size = 32
  # Token budget of a training batch (fairseq --max-tokens), global like batch_size: each
  # process's batches hold <= max_tokens // process_count padded tokens per feature. 0 = off.
  # On, training ignores batch_size (eval keeps eval_batch_size): 'pad'/'bucket' give each
  # length bucket a static row count, max_tokens / width ('pad' acts as 'bucket' with a window
  # of one batch); 'pack'/'concat' rows are all max_length wide, so it just sets the row count.
  c.max_tokens = 0
  c.batching = 'concat' if name in ('lm1b', 'tiny_shakespeare') else 'bucket'
  if name in images.IMAGE_DATASETS:
    c.batching = 'pad'  # images: fixed rows, no lengths to bucket
  c.num_length_buckets = 4         # padded lengths: max_length, /2, /4, ... (multiples of 8)
  c.bucket_window = 16             # batches sorted together in 'bucket' mode
  c.pack_bins = 0                  # first-fit bins in 'pack' mode; 0 = 2 * per-process batch
  c.shuffle = True
  c.num_epochs = 0                 # 0 = repeat the training split forever
  c.eval_splits = ''               # comma-separated; '' = the dataset's default
  c.eval_max_examples = 0          # 0 = whole split

  # Loading: grain reader threads, and worker processes (0 = in the main process).
  c.read_threads = 2
  c.num_workers = 0
  c.lock()
  return c


def task_of(cfg) -> str:
  """'seq2seq' | 'classification' | 'lm' | 'image_classification' for the dataset the config
  names."""
  if cfg.name in images.IMAGE_DATASETS:
    return images.TASK
  if cfg.name in algorithmic.ALGORITHMIC_TASKS:
    return 'seq2seq'
  if cfg.name == 'listops':
    return 'classification'
  if cfg.name == 'local':
    return cfg.local.task
  return named.spec_for(cfg.name).task


def static_meta(cfg) -> dict:
  """What the data fixes before anything is loaded: its task, and for images their shape and
  classes (so a model can be checked against the data before any data is read)."""
  task = task_of(cfg)
  if formats.format_of(task).images:
    spec = images.spec_for(cfg.name)
    return {'task': task, 'image_shape': spec.shape, 'num_classes': spec.num_classes}
  return {'task': task}


def _positive(cfg, *names):
  for n in names:
    if cfg[n] < 1:
      raise ValueError(f'data.{n}={cfg[n]} must be >= 1.')


def validate_config(cfg, process_count: int = 1) -> None:
  """Raises ValueError naming the field for anything make_datasets could not honour."""
  from attn_jax.data import batching, listops, local, tokenizers  # grain/TFDS: not at import.

  if cfg.name not in DATASET_NAMES and not named.is_named(cfg.name):
    raise ValueError(f'data.name={cfg.name!r}; allowed: {DATASET_NAMES}.')
  task = task_of(cfg)
  if formats.format_of(task).images:  # no tokens: no tokenizer, length or packing rule applies
    images.validate_config(cfg)
    _positive(cfg, 'batch_size', 'eval_batch_size', 'read_threads')
    _check_counts(cfg, process_count)
    return
  if cfg.name in algorithmic.ALGORITHMIC_TASKS:
    algorithmic.validate_params(algorithmic_params(cfg, seed=0))
  if cfg.name == 'listops':
    listops.validate_params(listops_params(cfg, seed=0))
  if cfg.name == 'local':
    local.validate_config(cfg.local)
  kind = cfg.tokenizer.kind
  allowed = ('', 'word') if cfg.name in GENERATED else ('', 'byte', 'char', 'sentencepiece')
  if kind not in allowed:
    raise ValueError(f'data.tokenizer.kind={kind!r} for {cfg.name}; allowed: {allowed}.')
  if cfg.tokenizer.model_type not in tokenizers.SENTENCEPIECE_MODEL_TYPES:
    raise ValueError(f'data.tokenizer.model_type={cfg.tokenizer.model_type!r}; allowed: '
                     f'{tokenizers.SENTENCEPIECE_MODEL_TYPES}.')
  if cfg.batching not in batching.BATCHING_MODES:
    raise ValueError(f'data.batching={cfg.batching!r}; allowed: {batching.BATCHING_MODES}.')
  fmt = formats.format_of(task)
  if cfg.batching == 'concat' and not fmt.lm:
    raise ValueError(f"data.batching='concat' is for language modelling, not {task}.")
  if cfg.batching == 'pack' and fmt.labeled:
    raise ValueError(f"data.batching='pack' is not supported for {task} (one label per "
                     "row); use 'pad' or 'bucket'.")
  for n in ('length_policy', 'eval_length_policy'):
    if cfg[n] not in batching.LENGTH_POLICIES:
      raise ValueError(f'data.{n}={cfg[n]!r}; allowed: {batching.LENGTH_POLICIES}.')
  _positive(cfg, 'max_length', 'batch_size', 'eval_batch_size', 'num_length_buckets',
            'bucket_window', 'read_threads')
  if cfg.max_length < 2 or (cfg.max_target_length and cfg.max_target_length < 2):
    raise ValueError('data.max_length / max_target_length must be >= 2 (a token plus EOS).')
  _check_counts(cfg, process_count)
  _validate_max_tokens(cfg, task, process_count)


def _check_counts(cfg, process_count: int) -> None:
  for n in ('batch_size', 'eval_batch_size'):
    if cfg[n] % process_count:
      raise ValueError(f'data.{n}={cfg[n]} is not divisible by process_count={process_count}.')
  for n in ('num_workers', 'num_epochs', 'eval_max_examples', 'pack_bins'):
    if cfg[n] < 0:
      raise ValueError(f'data.{n}={cfg[n]} must be >= 0.')


def _validate_max_tokens(cfg, task: str, process_count: int) -> None:
  max_tokens = cfg.max_tokens
  if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
    raise ValueError(f'data.max_tokens={max_tokens!r} must be an int >= 0 (0 = off).')
  if not max_tokens:
    return
  widest = cfg.max_length
  if formats.format_of(task).paired:
    widest = max(widest, cfg.max_target_length or cfg.max_length)
  per_process = max_tokens // process_count
  if per_process < widest:
    raise ValueError(f'data.max_tokens={max_tokens} gives {per_process} tokens per process '
                     f'(process_count={process_count}), less than the widest padded row '
                     f'({widest} tokens: max_length / max_target_length); use at least '
                     f'{widest * process_count}.')


def algorithmic_params(cfg, seed: int) -> dict:
  a = cfg.algorithmic
  return {'task': cfg.name, 'num_symbols': a.num_symbols, 'train_length': list(a.train_length),
          'test_length': list(a.test_length), 'num_train': a.num_train,
          'num_validation': a.num_validation, 'num_test': a.num_test, 'seed': seed}


def listops_params(cfg, seed: int) -> dict:
  p = cfg.listops
  return {'length': list(p.length), 'max_depth': p.max_depth, 'max_args': p.max_args,
          'operator_prob': p.operator_prob, 'num_train': p.num_train,
          'num_validation': p.num_validation, 'num_test': p.num_test, 'seed': seed}
