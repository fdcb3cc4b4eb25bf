"""Loading datasets as in-memory arrays, with a seeded validation split.

Source order for MNIST-style datasets: an explicit directory of IDX files
(`config.data.dir`), else the system copy (Debian's `dataset-fashion-mnist`
puts it in /usr/share/datasets/fashion-mnist/), else TFDS through
`tfds.data_source` (random access, no TensorFlow needed). CIFAR-10, IMDB and
ImageNet come only from TFDS; for them `config.data.dir` is the TFDS data_dir
('' = TFDS's default, ~/tensorflow_datasets). `tfds.data_source` reads only
datasets built with `--file_format=array_record`, and decoding their images
needs Pillow or OpenCV.
"""
import collections
import dataclasses
import gzip
import mmap
import os
import re
import struct
import zlib

from absl import logging
import numpy as np

from tcn_jax.errors import TCNError

IDX_NAMES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
SYSTEM_DIRS = {'fashion_mnist': '/usr/share/datasets/fashion-mnist',
               'mnist': '/usr/share/datasets/mnist'}
IDX_DATASETS = ('fashion_mnist', 'mnist')
_BUILD = '--file_format=array_record'
HOW_TO_GET = {
    'fashion_mnist': 'apt-get install -y dataset-fashion-mnist, or pass '
                     '--config.data.dir=DIR_WITH_IDX_FILES, or download it '
                     f'with TFDS (tfds build fashion_mnist {_BUILD})',
    'mnist': 'pass --config.data.dir=DIR_WITH_IDX_FILES, or download it '
             f'with TFDS (tfds build mnist {_BUILD})',
    'cifar10': f'download it with TFDS (tfds build cifar10 {_BUILD}) into '
               '~/tensorflow_datasets or into --config.data.dir',
    'imdb': f'download it with TFDS (tfds build imdb_reviews {_BUILD}) into '
            '~/tensorflow_datasets or into --config.data.dir',
    'image_folder': 'pass --config.data.dir=DIR holding train/ and test/ (or '
                    'val/) folders with one sub-folder of JPEG/PNG images '
                    'per class',
    'imagenet': 'download the ILSVRC2012 train and val tar files by hand into '
                '~/tensorflow_datasets/downloads/manual/ and run tfds build '
                f'imagenet2012 {_BUILD}',
}
DATASETS = tuple(HOW_TO_GET)
NUM_CLASSES = {'fashion_mnist': 10, 'mnist': 10, 'cifar10': 10, 'imdb': 2,
               'imagenet': 1000, 'image_folder': 0}   # 0: the folder's.
# Class names by label id (an image folder's are its sorted sub-folders).
CLASS_NAMES = {
    'fashion_mnist': ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                      'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot'],
    'mnist': [str(i) for i in range(10)],
    'cifar10': ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                'frog', 'horse', 'ship', 'truck'],
    'imdb': ['negative', 'positive']}
# Config names whose TFDS name differs, and TFDS's name for the test split.
TFDS_NAMES = {'imdb': 'imdb_reviews', 'imagenet': 'imagenet2012'}
TEST_SPLITS = {'imagenet': 'validation'}  # imagenet2012 has no labelled test.
RESIZED = ('imagenet',)  # Images of varying sizes: resized to image_size.
# Image folders (data.name='image_folder', or data.layout='folder'):
# data.streaming 'auto' streams when the decoded train split would take more
# than data.memory_limit_mb, or when data.augment changes images per epoch.
STREAMING = ('auto', 'always', 'never')
LAYOUTS = ('', 'folder')   # data.layout: the dataset's own source, or a folder.
# The defaults of base_config's data.image_size, vocab_size, max_len.
IMAGE_SIZE, VOCAB_SIZE, MAX_LEN = 224, 1000, 500
# configs/image_folder.py's data.image_size / data.channels 0 ('auto'): a
# Keras teacher file's input (config.follow_teacher_input), else these.
FOLDER_AUTO_SIZE, FOLDER_AUTO_CHANNELS = 64, 3
# data.bad_images: 'stop' at an image that does not decode (one error naming
# the file), or 'skip' files that are not images (truncated ones decode as
# far as they go).
BAD_IMAGES = ('stop', 'skip')
# One decoded image (float32) times this (resize buffers, batches in
# flight) must fit in data.memory_limit_mb: checked before any decoding.
IMAGE_MEMORY_FACTOR = 64
# Keras imdb.load_data ids: 0 pads, 1 starts a review, 2 replaces a word out
# of the vocabulary; the word of frequency rank r (0 = most frequent) is
# r + INDEX_FROM = r + 4 and id 3 is never used, exactly as Keras (whose
# word_index is 1-based, with index_from=3).
PAD, START, OOV, INDEX_FROM = 0, 1, 2, 4
_BREAK = re.compile(r'<br\s*/?>', re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")  # Letters, inner apostrophes.


@dataclasses.dataclass
class Split:
  """One split: inputs `x` (N, ...) and integer labels `y` (N,)."""
  x: np.ndarray
  y: np.ndarray

  def __len__(self):
    return len(self.y)


@dataclasses.dataclass
class Dataset:
  """A dataset in memory, as `tcn.load_dataset` returns it.

  Attributes:
    train, val, test: `Split`s; images float32 in [0, 1], (N, H, W, C).
      val is a seeded part of the original train split, never of test.
    num_classes: the number of labels.
    source: where it was read (an IDX directory, or 'tfds').
  """
  train: Split
  val: Split
  test: Split
  num_classes: int
  source: str
  classes: list | None = None   # Class names (an image folder's).


def class_names(ds: 'Dataset', name: str) -> list[str] | None:
  """The names of the labels 0, 1, ... (None when unknown)."""
  names = ds.classes or CLASS_NAMES.get(name)
  return [str(n) for n in names] if names else None


def read_idx(path: str, expected_magic: int) -> np.ndarray:
  """Reads one (optionally gzipped) IDX file; raises TCNError on bad files."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise TCNError(f'cannot read IDX file {path}: {e}') from None
  if len(raw) < 4 or struct.unpack('>I', raw[:4])[0] != expected_magic:
    raise TCNError(f'{path} is not an IDX file of the expected kind '
                   f'(magic number should be {expected_magic:#010x})')
  ndim = expected_magic & 0xFF
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise TCNError(f'{path} is truncated: its {len(raw)} bytes end inside '
                   f'the {header}-byte header')
  shape = struct.unpack(f'>{ndim}I', raw[4:header])
  size = int(np.prod(shape))
  if len(raw) - header != size:
    raise TCNError(f'{path} is truncated or padded: header says {size} '
                   f'values, file holds {len(raw) - header}')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find(directory, stem):
  for name in (stem, stem + '.gz', stem.replace('-idx', '.idx')):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  raise TCNError(f'no IDX file {stem}[.gz] in {directory}')


def load_idx(directory: str, split: str) -> Split:
  images, labels = (_find(directory, s) for s in IDX_NAMES[split])
  x = read_idx(images, 0x00000803)
  y = read_idx(labels, 0x00000801)
  if len(x) != len(y):
    raise TCNError(f'{images} holds {len(x)} images but {labels} holds '
                   f'{len(y)} labels')
  return Split(x[..., None], y.astype(np.int32))


def resize_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) triangle-filter weights, widened when shrinking so every
  input pixel counts (antialiasing, like PIL's BILINEAR)."""
  scale = n_in / n_out
  support = max(scale, 1.0)
  centers = (np.arange(n_out) + 0.5) * scale
  dist = np.abs(np.arange(n_in) + 0.5 - centers[:, None]) / support
  w = np.maximum(0.0, 1.0 - dist)
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes (H, W, C) uint8 so the shorter side is `size`, then crops the
  centre `size` x `size`; numpy only, so no image library is needed."""
  h, w = image.shape[:2]
  scale = size / min(h, w)
  new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  rows = resize_weights(h, new_h)[top:top + size]
  cols = resize_weights(w, new_w)[left:left + size]
  out = np.einsum('oh,hwc->owc', rows, image.astype(np.float32))
  out = np.einsum('pw,owc->opc', cols, out)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def tokenize(text) -> list[str]:
  """IMDB review -> lower-case words: `<br />` tags become spaces; a word is
  a run of letters (any alphabet) with apostrophes allowed inside (don't);
  digits, punctuation and edge apostrophes separate words and are dropped."""
  if isinstance(text, np.ndarray):
    text = text.item()
  if isinstance(text, bytes):
    text = text.decode('utf-8', 'replace')
  return _WORD.findall(_BREAK.sub(' ', text).lower())


def build_vocab(texts, vocab_size: int = VOCAB_SIZE) -> dict[str, int]:
  """Word -> id for the words whose id stays below `vocab_size` (Keras's
  num_words): ranked by count in `texts`, ties alphabetically."""
  counts = collections.Counter()
  for text in texts:
    counts.update(tokenize(text))
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  return {word: rank + INDEX_FROM for rank, (word, _) in
          enumerate(ranked[:max(vocab_size - INDEX_FROM, 0)])}


def encode(texts, vocab: dict[str, int], max_len: int = MAX_LEN) -> np.ndarray:
  """(N, max_len) int32 ids as Keras imdb.load_data + pad_sequences: START,
  then word ids (OOV outside `vocab`); pre-truncated (the last max_len ids
  stay) and pre-padded with PAD."""
  out = np.full((len(texts), max_len), PAD, np.int32)
  for i, text in enumerate(texts):
    ids = ([START] + [vocab.get(w, OOV) for w in tokenize(text)])[-max_len:]
    out[i, max_len - len(ids):] = ids
  return out


def tfds_source(name: str, split: str, data_dir: str | None = None):
  """Opens a TFDS split for random access; TCNError saying how to get it."""
  import tensorflow_datasets as tfds  # Imported lazily: slow to import.
  tfds_name = TFDS_NAMES.get(name, name)
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir,
                            download=False)
  except Exception as e:  # TFDS raises many types for a missing dataset.
    how = HOW_TO_GET.get(name, f'download it with TFDS (tfds build '
                         f'{tfds_name} {_BUILD})')
    raise TCNError(f'dataset {name!r} (TFDS {tfds_name}, {split}) is not '
                   f'available: {how} [{type(e).__name__}]') from None


def _read_tfds(name, source, indices, image_size) -> Split:
  """Decodes just the records `indices` of an open TFDS source."""
  if not len(indices) and len(source):  # Keep x's shape on an empty subset.
    one = _read_tfds(name, source, [0], image_size)
    return Split(one.x[:0], one.y[:0])
  try:
    records = [source[int(i)] for i in indices]
  except ImportError as e:  # TFDS decodes images with Pillow or OpenCV.
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise TCNError(f'cannot decode {name} records ({first}): pip install '
                   'pillow') from None
  y = np.asarray([r['label'] for r in records], np.int32).reshape(-1)
  if records and 'text' in records[0]:
    x = np.empty(len(records), object)
    x[:] = [r['text'] for r in records]
    return Split(x, y)
  images = [r['image'] for r in records]
  if name in RESIZED:
    images = [resize_center_crop(im, image_size) for im in images]
  return Split(np.stack(images) if images else np.zeros(0, np.uint8), y)


def _check_dir(data_dir):
  if data_dir and not os.path.isdir(data_dir):
    raise TCNError(f'config.data.dir {data_dir!r} is not a directory')


def _open(name, split, data_dir, image_size):
  """(size, read, source) of a raw split; read(indices) -> Split of just
  those records, so TFDS datasets decode only what a subset needs."""
  if name not in DATASETS:
    raise TCNError(f'unknown dataset {name!r} (config.data.name); '
                   f'choose one of {DATASETS}')
  _check_dir(data_dir)
  if name in IDX_DATASETS:
    system = SYSTEM_DIRS.get(name)
    directory = data_dir or (system if system and os.path.isdir(system)
                             else '')
    if directory:
      whole = load_idx(directory, split)
      _check_labels(name, whole.y, NUM_CLASSES[name])
      return len(whole), lambda i: Split(whole.x[i], whole.y[i]), directory
  if split == 'test':
    split = TEST_SPLITS.get(name, split)
  source = tfds_source(name, split, data_dir or None)
  return (len(source), lambda i: _read_tfds(name, source, i, image_size),
          'tfds')


def _check_labels(name, y, num_classes):
  if len(y) and (y.min() < 0 or y.max() >= num_classes):
    raise TCNError(f'labels of {name} outside [0, {num_classes}): '
                   f'found {y.min()}..{y.max()}')


def _option(cfg, field, least):
  value = cfg[field]
  if not isinstance(value, int) or isinstance(value, bool) or value < least:
    raise TCNError(f'config.data.{field} must be an integer >= {least}, '
                   f'got {value!r}')
  return value


def load(cfg) -> Dataset:
  """Loads `cfg.name`, carves a seeded validation split from train, scales.

  Images become float32 in [0, 1] (divided by 255, no mean/std, as the
  paper's code); ImageNet's are first resized (shorter side) and centre-
  cropped to `cfg.image_size`. IMDB becomes int32 ids (see `encode`) over a
  vocabulary of `cfg.vocab_size` built from the whole TFDS train split (val
  carve-out included, test never), padded to `cfg.max_len`. `cfg` is a
  whole `data` section of `config.base_config()` (`config.data_config`
  makes one). `cfg.train_size` / `cfg.test_size` (0 = all)
  take seeded subsets; only their records are read from TFDS. Whole splits
  are held in memory: full ImageNet (~1.28M images) does not fit, so use it
  through train_size / test_size subsets.
  """
  if is_folder(cfg):
    raise TCNError('an image folder (config.data.layout) is loaded by '
                   'tcn_jax.input_pipeline.load')
  image_size = _option(cfg, 'image_size', 1)
  vocab_size = _option(cfg, 'vocab_size', INDEX_FROM + 1)
  max_len = _option(cfg, 'max_len', 1)
  num_classes = NUM_CLASSES.get(cfg.name, 10)
  n_train, read_train, source = _open(cfg.name, 'train', cfg.dir, image_size)
  n_test, read_test, _ = _open(cfg.name, 'test', cfg.dir, image_size)
  train_idx, val_idx, test_idx = split_rows(n_train, n_test, cfg)
  vocab = None
  if cfg.name == 'imdb':  # The vocabulary needs every train text.
    whole = read_train(np.arange(n_train))
    vocab = build_vocab(whole.x, vocab_size)
    parts = [Split(whole.x[i], whole.y[i]) for i in (train_idx, val_idx)]
  else:
    parts = [read_train(train_idx), read_train(val_idx)]
  parts.append(read_test(test_idx))
  for part in parts:
    _check_labels(cfg.name, part.y, num_classes)

  def finish(split):
    if vocab is not None:
      return Split(encode(split.x, vocab, max_len), split.y)
    return Split(split.x.astype(np.float32) / 255.0, split.y)

  return Dataset(*map(finish, parts), num_classes, source)


def is_folder(cfg) -> bool:
  """Whether data section `cfg` names an image folder."""
  return cfg.name == 'image_folder' or cfg.layout == 'folder'


def split_rows(n_train, n_test, cfg):
  """(train, val, test) row indices of a dataset's raw train and test
  splits: a seeded validation part of train, seeded subsets."""
  rng = np.random.default_rng(cfg.split_seed)
  order = rng.permutation(n_train)
  n_val = int(round(n_train * cfg.val_fraction))
  val_idx, train_idx = order[:n_val], order[n_val:]
  if cfg.train_size:
    train_idx = train_idx[:cfg.train_size]
    val_idx = val_idx[:max(cfg.train_size // 4, 1)]
  test_idx = np.arange(n_test)
  if cfg.test_size:
    test_idx = rng.permutation(n_test)[:cfg.test_size]
  return train_idx, val_idx, test_idx


def check_folder_options(cfg):
  """The image-folder fields of data section `cfg`, checked; TCNError
  naming the first bad one (the augmentation is checked by the config)."""
  _option(cfg, 'memory_limit_mb', 1)
  for field in ('image_size', 'channels', 'workers',   # Sizes 0: 'auto'.
                'checkpoint_every_steps'):
    _option(cfg, field, 0)
  if folder_shape(cfg)[1] not in (1, 3):
    raise TCNError(f"config.data.channels must be 1 or 3, got "
                   f"{cfg.channels!r}")
  if cfg.streaming not in STREAMING:
    raise TCNError(f'config.data.streaming must be one of {STREAMING}, got '
                   f'{cfg.streaming!r}')
  if cfg.bad_images not in BAD_IMAGES:
    raise TCNError(f'config.data.bad_images must be one of {BAD_IMAGES}, got '
                   f'{cfg.bad_images!r}')
  size, channels = folder_shape(cfg)
  need = size * size * channels * 4 * IMAGE_MEMORY_FACTOR
  if need > cfg.memory_limit_mb * 2 ** 20:
    raise TCNError(
        f'config.data.image_size={size} needs '
        f'{size * size * channels * 4 / 2 ** 20:,.0f} MB per decoded image '
        f'({channels} channels, float32), too much for '
        f'config.data.memory_limit_mb={cfg.memory_limit_mb} (at least '
        f'{IMAGE_MEMORY_FACTOR} images are in flight); lower image_size or '
        'raise memory_limit_mb')


def folder_shape(cfg) -> tuple[int, int]:
  """(image_size, channels) of an image folder's data section; 0 is
  'auto' (config.resolve: a Keras teacher file's input), else
  FOLDER_AUTO_SIZE / FOLDER_AUTO_CHANNELS."""
  return (cfg.image_size or FOLDER_AUTO_SIZE,
          cfg.channels or FOLDER_AUTO_CHANNELS)


def check_folder(cfg):
  """The checks of an image-folder config that read no image: the folder
  and its train/ and test/ (or val/) sub-folders exist."""
  check_folder_options(cfg)
  root = cfg.dir
  if not root:
    raise TCNError('config.data.dir must name the image folder: '
                   + HOW_TO_GET['image_folder'])
  _check_dir(root)
  for split in ('train', ('test', 'val')):
    names = (split,) if isinstance(split, str) else split
    if not any(os.path.isdir(os.path.join(root, n)) for n in names):
      raise TCNError(f'config.data.dir {root!r} has no {"/ or ".join(names)}/'
                     ' folder: ' + HOW_TO_GET['image_folder'])


def drop_pages(a):
  """Drops the pages of memory map `a` from this process (the OS's file
  cache keeps them), so resident memory does not grow with the file."""
  while a is not None and getattr(a, '_mmap', None) is None:
    a = getattr(a, 'base', None)
  if a is not None and hasattr(mmap, 'MADV_DONTNEED'):
    a._mmap.madvise(mmap.MADV_DONTNEED)  # pylint: disable=protected-access
