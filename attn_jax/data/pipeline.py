"""`make_datasets`: a data config -> training iterator, eval datasets, tokenizers and metadata.

    cfg = attn_jax.data.default_config('listops')
    data = attn_jax.data.make_datasets(cfg, data_dir='/tmp/tfds', seed=0)
    batch = next(data.train)                  # {'inputs': int32 [b, L], 'label': int32 [b]}
    state = data.train.get_state()            # JSON-able; data.train.set_state(state) resumes
    for batch in data.eval['test']: ...       # iterate again for every evaluation
    data.tokenizers['targets'].decode(ids)    # detokenize for BLEU

Image datasets (`digits`, `mnist`, `cifar10`) give {'image': float32 [b, H, W, C], 'label':
int32 [b]} batches, no tokenizers, and eval padding rows labelled -1 (see
`attn_jax.data.images`).

Per process: the source is sharded `[process_index::process_count]` before shuffling, so hosts
read disjoint examples, and `batch_size` (global) is divided by `process_count`. The training
split is shuffled with `seed` each epoch and repeated (`num_epochs=0`: forever; prefer it on
several hosts, whose finite epochs can differ by a batch). Eval splits are never packed, and
(except LM 'concat' eval) every process gets the same number of eval batches, padded with
all-pad batches/rows: weight rows by `(inputs != 0).any(-1)`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import grain
import numpy as np

from attn_jax.data import (
    algorithmic,
    batching,
    builders,
    formats,
    images,
    local,
    named,
    tokenizers,
)
from attn_jax.data import config as config_lib
from attn_jax.data import listops as listops_lib

TOKENIZER_DIR = 'attn_jax_tokenizers'


@dataclasses.dataclass
class DataBundle:
  """What the training loop gets from `make_datasets`.

  Attributes:
    train: iterator of training batches (grain DatasetIterator: get_state()/set_state()).
    train_dataset: the IterDataset behind `train` (iter() it again for a fresh iterator).
    eval: split name -> IterDataset of eval batches (finite; iterate it for each evaluation).
    tokenizers: 'inputs' and 'targets' (the same object when joint or not seq2seq).
    meta: task, vocab sizes, num_classes, lengths, splits, tokenizer paths, skipped counts.
    length_policies: name -> LengthPolicy whose `.counts` say how many examples were
      truncated/filtered so far in this process ('train', and one per eval split).
  """

  train: Any
  train_dataset: grain.IterDataset
  eval: dict[str, grain.IterDataset]
  tokenizers: dict[str, tokenizers.Tokenizer]
  meta: dict[str, Any]
  length_policies: dict[str, batching.LengthPolicy]

  def save_tokenizers(self, directory: str) -> dict[str, str]:
    """Writes the tokenizers under `directory` (e.g. the run's workdir); returns role -> path."""
    paths = {}
    for role, tok in self.tokenizers.items():
      paths[role] = tokenizers.save_tokenizer(
          tok, os.path.join(directory, f'{role}_{tokenizers.tokenizer_filename(tok.kind)}'))
    return paths


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class _Canonical:
  """Raw record of a local/generated dataset -> canonical fields (picklable for workers)."""

  def __init__(self, mapping: dict[str, str]):
    self.mapping = mapping  # canonical name -> record key

  def __call__(self, record: dict) -> dict:
    return {k: (int(record[v]) if k == 'label' else _text(record[v]))
            for k, v in self.mapping.items()}


class Encode:
  """Canonical example -> int32 token arrays ending in EOS (and an int32 label)."""

  def __init__(self, task: str, inputs_tok, targets_tok):
    self.task, self.inputs_tok, self.targets_tok = task, inputs_tok, targets_tok

  @staticmethod
  def _eos(ids: np.ndarray) -> np.ndarray:
    return np.append(ids.astype(np.int32), np.int32(tokenizers.EOS_ID))

  def __call__(self, ex: dict) -> dict[str, np.ndarray]:
    fmt = formats.format_of(self.task)
    if fmt.paired:
      return {'inputs': self._eos(self.inputs_tok.encode(ex['source'])),
              'targets': self._eos(self.targets_tok.encode(ex['target']))}
    out = {'inputs': self._eos(self.inputs_tok.encode(ex['text']))}
    if fmt.labeled:
      out['label'] = np.int32(ex['label'])
    return out


def _sources(cfg, data_dir: str):
  """(split -> MapDataset of canonical examples, meta with splits, cache key, classes)."""
  if cfg.name in algorithmic.ALGORITHMIC_TASKS:
    b = builders.prepare('algorithmic', config_lib.algorithmic_params(cfg, cfg.data_seed),
                         data_dir)
    canon, evals, meta = _Canonical({'source': 'inputs', 'target': 'targets'}), \
        ('validation', 'test'), {}
  elif cfg.name == 'listops':
    b = builders.prepare('listops', config_lib.listops_params(cfg, cfg.data_seed), data_dir)
    canon, evals = _Canonical({'text': 'text', 'label': 'label'}), ('validation', 'test')
    meta = {'num_classes': listops_lib.NUM_CLASSES, 'label_names': list(listops_lib.DIGITS)}
  elif cfg.name == 'local':
    b, info = local.prepare_corpus(cfg.local, data_dir, cfg.data_seed)
    fmt = formats.format_of(cfg.local.task)
    canon, evals = _Canonical(fmt.features()), tuple(s for s in info['splits'] if s != 'train')
    meta = {'skipped': info['skipped'], 'label_names': info['label_names']}
    if fmt.labeled:
      meta['num_classes'] = len(info['label_names'])
  else:
    spec = named.spec_for(cfg.name, reverse_translation=cfg.tfds.reverse_translation)
    b = named.load_builder(cfg.name, data_dir)
    canon, evals = named.Canonicalize(spec), spec.eval_splits
    meta = {}
    if formats.format_of(spec.task).labeled:
      meta = {'num_classes': spec.num_classes,
              'label_names': list(b.info.features[spec.label].names)}
    if cfg.tfds.train_split:
      meta['train_split'] = cfg.tfds.train_split
    if cfg.tfds.eval_splits:
      evals = tuple(s.strip() for s in cfg.tfds.eval_splits.split(',') if s.strip())
  if cfg.eval_splits:
    evals = tuple(s.strip() for s in cfg.eval_splits.split(',') if s.strip())
  train_split = meta.pop('train_split', 'train')
  sources = {split: _read_split(cfg, b, split).map(canon)
             for split in (train_split,) + tuple(evals)}
  meta.update(train_split=train_split, eval_splits=list(evals), dataset_key=_dataset_key(b))
  return sources, meta


def _read_split(cfg, builder, split: str) -> grain.MapDataset:
  try:
    src = builder.as_data_source(split=split)
  except Exception as e:
    raise ValueError(f'{cfg.name}: cannot read split {split!r}: {e}') from e
  return grain.MapDataset.source(src)


def _dataset_key(builder) -> str:
  return f'{builder.name}/{builder.builder_config.name}' if builder.builder_config else (
      builder.name)


def _default_kind(cfg, task: str) -> str:
  if cfg.name in config_lib.GENERATED:
    return 'word'
  if cfg.tokenizer.kind:
    return cfg.tokenizer.kind
  if formats.format_of(task).paired or cfg.name == 'lm1b':
    return 'sentencepiece'
  return 'char' if cfg.name == 'tiny_shakespeare' else 'byte'


def _train_texts(source: grain.MapDataset, fields: tuple[str, ...], limit: int, seed: int):
  n = len(source)
  order = np.random.default_rng(seed).permutation(n)[:limit] if limit and limit < n else range(n)
  if limit and limit < n:
    logging.info('Training the tokenizer on %d of %d training examples.', limit, n)
  for i in order:
    ex = source[int(i)]
    for f in fields:
      yield ex[f]


def _make_tokenizers(cfg, task: str, train_source, data_key: str, data_dir: str):
  """('inputs', 'targets') tokenizers: loaded, cached under data_dir, or trained and cached."""
  t = cfg.tokenizer
  kind = _default_kind(cfg, task)
  if kind == 'word':
    vocab = (list(listops_lib.VOCABULARY) if cfg.name == 'listops'
             else algorithmic.task_vocabulary(cfg.name, cfg.algorithmic.num_symbols))
    tok = tokenizers.WordTokenizer(vocab)
    return {'inputs': tok, 'targets': tok}, {}
  if t.path:
    inp = tokenizers.load_tokenizer(t.path)
    tgt = tokenizers.load_tokenizer(t.target_path) if t.target_path else inp
    return {'inputs': inp, 'targets': tgt}, {'inputs': t.path, 'targets': t.target_path or t.path}
  if kind == 'byte':
    tok = tokenizers.ByteTokenizer()
    return {'inputs': tok, 'targets': tok}, {}
  opts = {k: t[k] for k in ('vocab_size', 'model_type', 'joint', 'max_train_examples',
                            'char_max_vocab')}
  # Everything that changes what the tokenizer is trained on is part of its cache key.
  digest = builders.params_hash({'kind': kind, **opts, 'seed': cfg.data_seed,
                                 'reverse': cfg.tfds.reverse_translation,
                                 'train_split': cfg.tfds.train_split})
  directory = os.path.join(data_dir, TOKENIZER_DIR, data_key, f'{kind}_{digest}')
  fmt = formats.format_of(task)
  roles = {'joint': fmt.fields} if (not fmt.paired or t.joint) else {
      'inputs': fmt.fields[:1], 'targets': fmt.fields[1:]}
  made, paths = {}, {}
  for role, role_fields in roles.items():
    path = os.path.join(directory, f'{role}_{tokenizers.tokenizer_filename(kind)}')
    if os.path.exists(path):
      made[role] = tokenizers.load_tokenizer(path)
    else:
      texts = _train_texts(train_source, role_fields, t.max_train_examples, cfg.data_seed)
      if kind == 'char':
        made[role] = tokenizers.CharTokenizer.train(texts, max_vocab_size=t.char_max_vocab or None)
      else:
        # SentencePiece skips "sentences" over its max length (a whole book as one document
        # would be dropped), so it learns from lines.
        lines = (line for text in texts for line in text.splitlines())
        made[role] = tokenizers.SentencePieceTokenizer.train(
            lines, vocab_size=t.vocab_size, model_type=t.model_type)
      tokenizers.save_tokenizer(made[role], path)
      logging.info('Trained %s tokenizer (%d ids) -> %s', kind, made[role].vocab_size, path)
    paths[role] = path
  if 'joint' in made:
    return ({'inputs': made['joint'], 'targets': made['joint']},
            {'inputs': paths['joint'], 'targets': paths['joint']})
  return made, paths


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; outside an absl app (pytest, notebooks) nothing
  # parsed them and every read raises, so accept the defaults as parsed.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _batches(ds: grain.MapDataset, cfg, *, train: bool, seed: int, encode: Encode,
             max_lengths: dict[str, int], batch_size: int, process_index: int,
             process_count: int, buckets: batching.TokenBuckets | None = None,
             ) -> tuple[grain.IterDataset, batching.LengthPolicy | None]:
  # buckets: token-budget shapes of 'pad'/'bucket' training batches (batch_size is then unused).
  if not train and cfg.eval_max_examples:
    ds = ds[:cfg.eval_max_examples]
  total = len(ds)
  ds = ds[process_index::process_count]
  if train:
    if cfg.shuffle:
      ds = ds.shuffle(seed % 2 ** 32)
    ds = ds.repeat(cfg.num_epochs or None)
  ds = ds.map(encode)
  rows = buckets.rows[0] if buckets else batch_size
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                            prefetch_buffer_size=4 * rows))
  if cfg.num_workers:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  mode = cfg.batching if train else ('concat' if cfg.batching == 'concat' else 'pad')
  if mode == 'concat':
    return batching.concat_split(it, max_length=max_lengths['inputs'], batch_size=batch_size,
                                 drop_remainder=train), None
  policy = batching.LengthPolicy(max_lengths, cfg.length_policy if train
                                 else cfg.eval_length_policy)
  it = it.filter(policy)
  if mode == 'pack':
    bins = cfg.pack_bins or 2 * batch_size
    return batching.pack(it, max_lengths=max_lengths, batch_size=batch_size, num_bins=bins,
                         seed=seed, shuffle=train and cfg.shuffle, drop_remainder=train), policy
  if train and buckets:
    # 'pad' is 'bucket' with a one-batch window: static shapes need the per-bucket rows, and
    # arrival-order greedy batches would pad far more. Partial batches are padded, not dropped.
    return batching.TokenBucketBatchIterDataset(
        it, buckets=buckets, window=cfg.bucket_window if mode == 'bucket' else 1, seed=seed,
        shuffle=cfg.shuffle), policy
  pad = batching.PadBatch({f: batching.length_boundaries(m, cfg.num_length_buckets)
                           for f, m in max_lengths.items()}, batch_size)
  if mode == 'bucket':
    return batching.SortedWindowBatchIterDataset(
        it, batch_size=batch_size, window=cfg.bucket_window, seed=seed, batch_fn=pad,
        drop_remainder=train, shuffle=train and cfg.shuffle), policy
  it = it.batch(batch_size, drop_remainder=train, batch_fn=pad)
  if not train:
    # Every process runs the same number of eval steps: that of the largest shard.
    num_batches = math.ceil(math.ceil(total / process_count) / batch_size)
    template = {f: np.zeros((batch_size, b[0]), np.int32) for f, b in pad.boundaries.items()}
    if formats.format_of(encode.task).labeled:
      template['label'] = np.zeros((batch_size,), np.int32)
    it = batching.FixedBatchCountIterDataset(it, num_batches=num_batches, template=template)
  return it, policy


def _train_layout(cfg, max_lengths: dict[str, int], process_count: int, row_multiple: int,
                  ) -> tuple[int, batching.TokenBuckets | None, list[list[int]]]:
  """(rows of fixed-row train batches, token buckets or None, [rows, width] per train shape)."""
  batch_size = cfg.batch_size // process_count
  widest = max(max_lengths.values())
  if not cfg.max_tokens:
    if cfg.batching in ('pack', 'concat'):
      return batch_size, None, [[batch_size, widest]]
    widths = sorted({w for m in max_lengths.values()
                     for w in batching.length_boundaries(m, cfg.num_length_buckets)})
    return batch_size, None, [[batch_size, w] for w in widths]
  tokens = cfg.max_tokens // process_count
  if cfg.batching in ('pack', 'concat'):
    rows = batching.token_rows(tokens, widest, row_multiple)
    shapes, buckets = [[rows, widest]], None
  else:
    buckets = batching.TokenBuckets(max_lengths, cfg.num_length_buckets, tokens, row_multiple)
    rows, shapes = buckets.rows[0], buckets.shapes()
  logging.info('data.max_tokens=%d (%d per process): train batches (rows x width) %s.',
               cfg.max_tokens, tokens, ', '.join(f'{r} x {w}' for r, w in shapes))
  return rows, buckets, shapes


def make_datasets(cfg, *, data_dir: str | None = None, seed: int = 0, process_index: int = 0,
                  process_count: int = 1, validated: bool = False,
                  row_multiple: int = 1) -> DataBundle:
  """Builds everything the training loop reads; see the module docstring.

  Args:
    cfg: a data config from `default_config` (validated here before any work, unless
      `validated` says the caller has done it with `config.validate_config`).
    data_dir: where generated/converted/downloaded TFDS data and tokenizers are cached
      (default ~/tensorflow_datasets).
    seed: shuffling seed of the training split (dataset content uses cfg.data_seed).
    process_index / process_count: this host's shard (jax.process_index(), jax.process_count()).
    row_multiple: the training batch rows that `data.max_tokens` derives are rounded down to a
      multiple of it (e.g. the local device count under pmap, so rows divide over devices);
      ValueError if the budget holds no such multiple. Without max_tokens the rows are
      batch_size // process_count, which the caller checks.

  meta['batch_shapes'] lists the train batch shapes as [rows, width] (width: padded length, the
  widest feature's for seq2seq token buckets; without max_tokens every width a feature can
  take), meta['max_tokens'] the global budget and meta['per_process_batch_size'] the most rows.
  """
  if not validated:  # The experiment layer validates the whole config once, up front.
    config_lib.validate_config(cfg, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, process_count={process_count}).')
  data_dir = os.path.expanduser(data_dir or '~/tensorflow_datasets')
  task = config_lib.task_of(cfg)
  if formats.format_of(task).images:
    return _image_bundle(cfg, data_dir, seed=seed, process_index=process_index,
                         process_count=process_count)
  sources, meta = _sources(cfg, data_dir)
  toks, tok_paths = _make_tokenizers(cfg, task, sources[meta['train_split']],
                                     meta['dataset_key'], data_dir)
  encode = Encode(task, toks['inputs'], toks['targets'])
  max_lengths = {'inputs': cfg.max_length}
  if formats.format_of(task).paired:
    max_lengths['targets'] = cfg.max_target_length or cfg.max_length
  common = dict(encode=encode, max_lengths=max_lengths, process_index=process_index,
                process_count=process_count)
  train_rows, buckets, shapes = _train_layout(cfg, max_lengths, process_count, row_multiple)
  train_ds, train_policy = _batches(sources[meta['train_split']], cfg, train=True, seed=seed,
                                    batch_size=train_rows, buckets=buckets, **common)
  evals, policies = {}, {'train': train_policy} if train_policy else {}
  for split in meta['eval_splits']:
    evals[split], pol = _batches(sources[split], cfg, train=False, seed=seed,
                                 batch_size=cfg.eval_batch_size // process_count, **common)
    if pol:
      policies[split] = pol
  meta.update(
      task=task, input_vocab_size=toks['inputs'].vocab_size,
      target_vocab_size=toks['targets'].vocab_size, vocab_size=toks['targets'].vocab_size,
      max_length=cfg.max_length, max_target_length=max_lengths.get('targets', 0),
      batching=cfg.batching, tokenizer_kind=toks['inputs'].kind, tokenizer_paths=tok_paths,
      num_examples={s: len(src) for s, src in sources.items()},
      per_process_batch_size=train_rows, max_tokens=cfg.max_tokens, batch_shapes=shapes,
      special_ids={'pad': tokenizers.PAD_ID, 'bos': tokenizers.BOS_ID,
                   'eos': tokenizers.EOS_ID, 'unk': tokenizers.UNK_ID})
  meta.setdefault('num_classes', 0)
  return DataBundle(train=iter(train_ds), train_dataset=train_ds, eval=evals, tokenizers=toks,
                    meta=meta, length_policies=policies)


# --- Image classification (see attn_jax.data.images) -------------------------------------------


def _image_batches(ds: grain.MapDataset, cfg, spec: images.ImageSpec, *, train: bool, seed: int,
                   batch_size: int, process_index: int, process_count: int) -> grain.IterDataset:
  """Batches of one split: sharded, (training) shuffled per epoch, repeated and augmented;
  (eval) padded to `batch_size` rows and to the same number of batches on every process."""
  if not train and cfg.eval_max_examples:
    ds = ds[:cfg.eval_max_examples]
  total = len(ds)
  ds = ds[process_index::process_count].map(images.ToExample(spec))
  augment = images.augmentation(cfg) if train else 'none'
  if train:
    if cfg.shuffle:
      ds = ds.shuffle(seed % 2 ** 32)
    ds = ds.repeat(cfg.num_epochs or None)
  if augment != 'none':
    ds = ds.random_map(images.Augment(augment, cfg.image.crop_padding), seed=seed % 2 ** 32)
  it = ds.map(images.Normalize(spec)).to_iter_dataset(
      grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4 * batch_size))
  if cfg.num_workers:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  pad = images.PadImageBatch(batch_size)
  it = it.batch(batch_size, drop_remainder=train, batch_fn=pad)
  if train:
    return it
  num_batches = math.ceil(math.ceil(total / process_count) / batch_size)
  return batching.FixedBatchCountIterDataset(it, num_batches=num_batches,
                                             template=pad.empty(spec.shape))


def _image_bundle(cfg, data_dir: str, *, seed: int, process_index: int,
                  process_count: int) -> DataBundle:
  """`make_datasets` for an image dataset: no tokenizers, lengths or length policies."""
  spec = images.spec_for(cfg.name)
  builder = images.load_builder(cfg.name, data_dir)
  train_split = cfg.tfds.train_split or spec.train_split
  evals = next((tuple(s.strip() for s in v.split(',') if s.strip())
                for v in (cfg.eval_splits, cfg.tfds.eval_splits) if v), spec.eval_splits)
  sources = {split: _read_split(cfg, builder, split) for split in (train_split,) + evals}
  rows = cfg.batch_size // process_count
  common = dict(seed=seed, process_index=process_index, process_count=process_count)
  train = _image_batches(sources[train_split], cfg, spec, train=True, batch_size=rows, **common)
  evals_ds = {split: _image_batches(sources[split], cfg, spec, train=False,
                                    batch_size=cfg.eval_batch_size // process_count, **common)
              for split in evals}
  meta = dict(
      task=images.TASK, image_shape=list(spec.shape), num_classes=spec.num_classes,
      label_names=list(spec.label_names), train_split=train_split, eval_splits=list(evals),
      num_examples={s: len(src) for s, src in sources.items()}, dataset_key=_dataset_key(builder),
      per_process_batch_size=rows, batch_shapes=[[rows, *spec.shape]],
      augment=images.augmentation(cfg),
      normalization={'mean': list(spec.mean), 'std': list(spec.std)},  # images.normalize
      pad_label=images.PAD_LABEL)
  return DataBundle(train=iter(train), train_dataset=train, eval=evals_ds, tokenizers={},
                    meta=meta, length_policies={})
