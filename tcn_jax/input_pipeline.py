"""Streaming input on Grain: random-access sources, decoding, augmentation,
seeded batches (in worker processes), checkpointable iterators.

A `Stream` is one split that is read while training instead of held in
memory: a random-access source (in-memory arrays, `.npy` files opened as
memory maps, a folder of JPEG/PNG images with one sub-folder per class, or a
TFDS `data_source` of array_record files), the rows of it that belong to the
split, and a `Transform` (decode, resize + centre crop; random-resized crop
and flip for training). It behaves like the (N, H, W, C) float32 array the
in-memory path uses where a stage only needs a few rows (`len`, `shape`,
`x[a:b]`), and `Stream.batches` gives one epoch's training batches through
Grain: the batch order is `batch_order(seed, epoch)`, the same
batches as the in-memory path; augmentation draws from a seed of (seed,
epoch, row), so the batches do not depend on the number of workers; each
process reads its own slice of every global batch (multi-host); the
iterator's `get_state`/`set_state` let a stage stop and resume mid-epoch.

Grain's worker processes (`workers` > 0) need absl flags parsed (true under
`absl.app.run`, i.e. `tcn_jax.main`; tests call `flags.FLAGS.mark_as_parsed`).
"""
import dataclasses
import hashlib
import io
import math
import os

import grain
import jax
import numpy as np

from tcn_jax import augment
from tcn_jax import data as data_lib
from tcn_jax.errors import TCNError

drop_pages = data_lib.drop_pages   # Where the streamed loop finds it.

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
# Inception-style random-resized crop: area fraction and aspect ratio.
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


class ArraySource:
  """Random access to in-memory arrays: record i = {'image', 'label'}."""

  def __init__(self, x, y=None):
    self.x = x
    self.y = np.zeros(len(x), np.int32) if y is None else np.asarray(y)
    if len(self.y) != len(self.x):
      raise TCNError(f'{len(self.x)} inputs but {len(self.y)} labels')

  def __len__(self):
    return len(self.x)

  def __getitem__(self, i):
    return {'image': np.asarray(self.x[i]), 'label': np.int32(self.y[i])}

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for a in (self.x, self.y):
      h.update(f'{a.shape}{a.dtype}'.encode())
      h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


class NpySource(ArraySource):
  """`.npy` inputs (and optional labels) opened as memory maps: only the
  rows read are paged in; worker processes reopen the files."""

  def __init__(self, x_path: str, y_path: str | None = None):
    self.paths = (x_path, y_path)
    try:
      x = np.load(x_path, mmap_mode='r')
      y = None if y_path is None else np.load(y_path, mmap_mode='r')
    except (OSError, ValueError) as e:
      raise TCNError(f'cannot open .npy file: {e}') from None
    super().__init__(x, y)

  def __getstate__(self):
    return {'paths': self.paths}

  def __setstate__(self, state):
    self.__init__(*state['paths'])

  def fingerprint(self) -> str:
    return _files_fingerprint([p for p in self.paths if p])


def _files_fingerprint(paths) -> str:
  """A digest of file names, sizes and modification times (not contents:
  a large dataset is not read to fingerprint it)."""
  h = hashlib.sha256()
  for p in paths:
    st = os.stat(p)
    h.update(f'{p}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()


class ImageFolderSource:
  """A folder with one sub-folder per class of JPEG/PNG files (ImageNet's
  layout): classes are the sorted sub-folder names, labels their index;
  record i = {'encoded': the file's bytes, 'label'}.

  Args:
    root: the folder.
    field: the config field that named it (for errors).
    classes: the class names to use (e.g. train's for a test folder); by
      default the sub-folders found.
  """

  def __init__(self, root: str, field: str = 'config.data.dir',
               classes=None):
    if not os.path.isdir(root):
      raise TCNError(f'{field} {root!r} is not a directory')
    found = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)))
    if not found:
      raise TCNError(f'{field} {root!r} holds no class sub-folders (one '
                     'folder of images per class)')
    self.classes = list(classes) if classes is not None else found
    extra = sorted(set(found) - set(self.classes))
    if extra:
      raise TCNError(f'{field} {root!r} has classes that the training folder '
                     f'has not: {extra[:3]}')
    index = {c: i for i, c in enumerate(self.classes)}
    names, labels = [], []
    for c in found:
      here = sorted(n for n in os.listdir(os.path.join(root, c))
                    if n.lower().endswith(IMAGE_EXTENSIONS))
      names += [os.path.join(c, n).encode() for n in here]
      labels += [index[c]] * len(here)
    if not names:
      raise TCNError(f'{field} {root!r} holds no JPEG or PNG images in its '
                     'class sub-folders')
    self.root = root
    # One bytes array, not a list of str: ~30 bytes a file instead of ~150.
    self._names = np.asarray(names, dtype=bytes)
    self.labels = np.asarray(labels, np.int32)

  @property
  def files(self) -> list[str]:
    return [self.path(i) for i in range(len(self))]

  def path(self, i) -> str:
    return os.path.join(self.root, self._names[i].decode())

  def __len__(self):
    return len(self._names)

  def __getitem__(self, i):
    with open(self.path(i), 'rb') as f:
      return {'encoded': f.read(), 'label': self.labels[i]}

  def fingerprint(self) -> str:
    return _files_fingerprint(self.files)


class TfdsSource:
  """A TFDS split through `tfds.data_source` (array_record files, random
  access without TensorFlow); record i = {'image', 'label'}."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    self.args = (name, split, data_dir)
    self.source = data_lib.tfds_source(name, split, data_dir)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    r = self.source[int(i)]
    return {'image': np.asarray(r['image']), 'label': np.int32(r['label'])}

  def __getstate__(self):
    return {'args': self.args}

  def __setstate__(self, state):
    self.__init__(*state['args'])

  def fingerprint(self) -> str:
    return hashlib.sha256(repr((self.args, len(self))).encode()).hexdigest()


def _pil():
  try:
    from PIL import Image   # pylint: disable=g-import-not-at-top
  except ImportError:
    raise TCNError('decoding images needs Pillow: pip install pillow') from None
  return Image


def _crop_box(h, w, rng):
  """A random-resized crop (top, left, height, width), Inception-style;
  the centre square when 10 tries find none."""
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*CROP_SCALE)
    ratio = math.exp(rng.uniform(*np.log(CROP_RATIO)))
    cw = int(round(math.sqrt(target * ratio)))
    ch = int(round(math.sqrt(target / ratio)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  s = min(h, w)
  return (h - s) // 2, (w - s) // 2, s, s


def _resize_box(image, box, size):
  """Crops box (top, left, h, w) of (H, W, C) `image` and resizes it to
  size x size: with Pillow (bilinear) for uint8, with numpy for floats."""
  top, left, ch, cw = box
  if image.dtype == np.uint8:
    mode = 'L' if image.shape[-1] == 1 else None
    img = _pil().fromarray(image[..., 0] if mode else image, mode)
    out = np.asarray(img.resize((size, size), _pil().BILINEAR,
                                box=(left, top, left + cw, top + ch)))
    return out.reshape(size, size, image.shape[-1])
  rows = data_lib.resize_weights(ch, size)
  cols = data_lib.resize_weights(cw, size)
  part = image[top:top + ch, left:left + cw].astype(np.float32)
  return np.einsum('pw,owc->opc', cols, np.einsum('oh,hwc->owc', rows, part))


def _center_box(h, w, size):
  """The box that resizing the shorter side to `size` and cropping the
  centre size x size keeps (as `data.resize_center_crop`)."""
  s = min(h, w)
  return (h - s) // 2, (w - s) // 2, s, s


@dataclasses.dataclass(frozen=True)
class Transform:
  """Decoding and augmentation of one record into a float32 (H, W, C) image
  in [0, 1] (divided by 255, as the in-memory path).

  Attributes:
    image_size: resize + centre crop to image_size x image_size (eval), or
      random-resized crop to it (train, with `crop`); 0 keeps the size.
    channels: 1 or 3 converts decoded images (grey / RGB); 0 keeps them.
    crop: random-resized crop when training (needs image_size).
    flip: random left-right flip when training.
  """
  image_size: int = 0
  channels: int = 0
  crop: bool = False
  flip: bool = False

  @property
  def augments(self) -> bool:
    return self.crop or self.flip

  def decode(self, record) -> np.ndarray:
    """(H, W, C) uint8 (or the source's float) image of a record."""
    if 'encoded' in record:
      img = _pil().open(io.BytesIO(record['encoded']))
      if self.image_size and img.format == 'JPEG':
        img.draft('RGB' if self.channels != 1 else 'L',
                  (self.image_size, self.image_size))
      mode = {1: 'L', 3: 'RGB'}.get(self.channels) or (
          'L' if img.mode in ('L', 'I;16', '1') else 'RGB')
      image = np.asarray(img.convert(mode))
    else:
      image = np.asarray(record['image'])
    if image.ndim == 2:
      image = image[..., None]
    if self.channels == 3 and image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    elif self.channels == 1 and image.shape[-1] == 3 and image.dtype == np.uint8:
      image = np.asarray(_pil().fromarray(image).convert('L'))[..., None]
    return image

  def _finish(self, record, image):
    if image.dtype == np.uint8:
      image = image.astype(np.float32) / 255.0
    return {'image': image.astype(np.float32, copy=False),
            'label': np.int32(record['label']), 'index': record['index']}

  def eval(self, record):
    """Decode, resize (shorter side) and centre crop."""
    image = self.decode(record)
    h, w = image.shape[:2]
    if self.image_size and (h, w) != (self.image_size,) * 2:
      image = _resize_box(image, _center_box(h, w, self.image_size),
                          self.image_size)
    return self._finish(record, image)

  def train(self, record, rng: np.random.Generator):
    """Decode, random-resized crop (or the eval crop) and random flip."""
    if not self.crop:
      out = self.eval(record)
      if self.flip and rng.random() < 0.5:
        out['image'] = out['image'][:, ::-1]
      return out
    image = self.decode(record)
    h, w = image.shape[:2]
    image = _resize_box(image, _crop_box(h, w, rng), self.image_size)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return self._finish(record, np.ascontiguousarray(image))


class _Rows:
  """The rows `rows` of `source`, each record tagged with its position
  `index` in the split (which feature row, which label)."""

  def __init__(self, source, rows, positions):
    self.source, self.rows, self.positions = source, rows, positions

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    record = dict(self.source[int(self.rows[i])])
    record['index'] = np.int32(self.positions[i])
    return record


def epoch_seed(seed: int, epoch: int) -> int:
  """The augmentation seed of one epoch."""
  return int(np.random.SeedSequence([seed, epoch, 0x5EED])
             .generate_state(1)[0] >> 1)


class Stream:
  """One split of a random-access source, read through Grain.

  Args:
    source: a random-access source (`ArraySource`, `NpySource`,
      `ImageFolderSource`, `TfdsSource` or any `__len__`/`__getitem__`).
    transform: a `Transform`.
    rows: which of the source's records form the split (default: all).
    workers: Grain worker processes for decoding (0: in this process,
      with `threads` reader threads).
    threads: reader threads per process.
    prefetch: batches buffered per worker (or by the reader threads).
    checkpoint_every_steps: training saves a mid-epoch checkpoint (state +
      iterator) every K steps (0: only at epoch ends).
  """

  def __init__(self, source, transform=Transform(), rows=None, *,
               workers: int = 0, threads: int = 2, prefetch: int = 2,
               checkpoint_every_steps: int = 0):
    self.source, self.transform = source, transform
    self.rows = np.arange(len(source)) if rows is None else np.asarray(rows)
    self.workers, self.threads, self.prefetch = workers, threads, prefetch
    self.checkpoint_every_steps = checkpoint_every_steps
    self._example = None

  def __len__(self):
    return len(self.rows)

  def subset(self, rows) -> 'Stream':
    """The stream of this split's rows `rows` (same source and settings)."""
    out = Stream(self.source, self.transform, self.rows[np.asarray(rows)],
                 workers=self.workers, threads=self.threads,
                 prefetch=self.prefetch,
                 checkpoint_every_steps=self.checkpoint_every_steps)
    return out

  def _one(self, position):
    return self.transform.eval(
        {**self.source[int(self.rows[position])], 'index': position})

  @property
  def shape(self):
    if self._example is None:
      self._example = self._one(0)['image']
    return (len(self),) + self._example.shape

  @property
  def ndim(self):
    return len(self.shape)

  dtype = np.dtype(np.float32)

  @property
  def labels(self) -> np.ndarray:
    """The split's labels (from the source, without decoding images)."""
    src = self.source
    if hasattr(src, 'labels'):
      return np.asarray(src.labels)[self.rows]
    if hasattr(src, 'y'):
      return np.asarray(src.y)[self.rows]
    return np.asarray([src[int(r)]['label'] for r in self.rows], np.int32)

  def fingerprint(self) -> str:
    """A digest of the source and the rows (for stage keys)."""
    h = hashlib.sha256(self.source.fingerprint().encode())
    h.update(np.ascontiguousarray(self.rows.astype(np.int64)).data)
    h.update(repr(self.transform).encode())
    return h.hexdigest()

  def __getitem__(self, key):
    """Eval-transformed images of rows `key` (an int, slice or indices),
    decoded here: for a few rows (shapes, a validation batch)."""
    if isinstance(key, (int, np.integer)):
      return self._one(int(key) % len(self))['image']
    positions = np.arange(len(self))[key]
    if not len(positions):
      return np.zeros((0,) + self.shape[1:], np.float32)
    return np.stack([self._one(int(p))['image'] for p in positions])

  def __array__(self, dtype=None, copy=None):
    raise TCNError('a streamed split cannot be held as one array; this '
                   'stage reads it in batches')

  def _dataset(self, order, train, seed, epoch, batch_size, drop_remainder):
    ds = grain.MapDataset.source(_Rows(self.source, self.rows[order], order))
    if train and self.transform.augments:
      ds = ds.random_map(self.transform.train, seed=epoch_seed(seed, epoch))
    else:
      ds = ds.map(self.transform.eval)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    it = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self.threads, prefetch_buffer_size=max(self.prefetch, 1)
        * batch_size))
    if self.workers:
      it = it.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.workers, per_worker_buffer_size=self.prefetch))
    return it

  def batches(self, seed: int, epoch: int, batch_size: int, *,
              train: bool = True, state=None, process=None):
    """One epoch's training batches: an iterator of dicts {'image' (B, H,
    W, C) float32, 'label' (B,), 'index' (B,) positions in the split} in
    `batch_order(seed, epoch)`'s order (the in-memory path's), the
    tail dropped; with several processes, process k's slice of each global
    batch (`process`: (index, count), default JAX's). `state`: a
    `get_state()` of an earlier iterator of the same epoch, to go on from.
    """
    k, p = process or (jax.process_index(), jax.process_count())
    if batch_size % p:
      raise TCNError(f'batch size {batch_size} does not split over {p} '
                     'processes')
    local = batch_size // p
    order = batch_order(seed, epoch, len(self), batch_size)
    order = order[:, k * local:(k + 1) * local].reshape(-1)
    it = iter(self._dataset(order, train, seed, epoch, local, True))
    if state is not None:
      it.set_state(state)
    return it

  def in_order(self, batch_size: int):
    """Eval-transformed batches of the whole split in order (the last one
    smaller): for features and evaluation."""
    return iter(self._dataset(np.arange(len(self)), False, 0, 0, batch_size,
                              False))


def batch_order(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
  """The epoch's shuffled batches (steps, batch) of indices; drops the tail."""
  steps = n // batch_size
  if steps == 0:
    raise TCNError(f'batch size {batch_size} is larger than the {n} '
                   'training examples')
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def batched(fn, x: np.ndarray, batch_size: int = 1000, axis: int = 0):
  """Applies jitted `fn` over `x` in fixed-size batches (last one padded);
  x is an array or a streamed split (`input_pipeline.Stream`, read in
  order through Grain)."""
  outs = []
  if isinstance(x, Stream):
    batches = (b['image'] for b in x.in_order(batch_size))
  else:
    batches = (x[s:s + batch_size] for s in range(0, len(x), batch_size))
  for xb in batches:
    pad = batch_size - len(xb)
    if pad:
      xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
    out = np.asarray(fn(xb))
    outs.append(np.take(out, np.arange(batch_size - pad), axis=axis))
  return np.concatenate(outs, axis=axis)


def load_folder(cfg) -> data_lib.Dataset:
  """An image folder (`cfg.dir`/train/<class>/*.jpg|png and test/ or val/,
  ImageNet's layout) as a Dataset: class names and count from train's
  sub-folders; images decoded, resized (shorter side) and centre-cropped
  to `cfg.image_size` with `cfg.channels`; a seeded validation split of
  train as `data.load`. Splits are `Stream`s when `cfg.streaming` asks (or
  'auto' finds train too large for `cfg.memory_limit_mb`, or `cfg.augment`
  changes images per epoch), else arrays decoded once (the in-memory path).
  """
  data_lib.check_folder(cfg)
  aug = augment.get(cfg.augment)
  root = cfg.dir
  train_src = ImageFolderSource(os.path.join(root, 'train'),
                                'config.data.dir train/')
  test_dir = next(os.path.join(root, n) for n in ('test', 'val')
                  if os.path.isdir(os.path.join(root, n)))
  test_src = ImageFolderSource(test_dir, f'config.data.dir '
                               f'{os.path.basename(test_dir)}/',
                               classes=train_src.classes)
  transform = Transform(cfg.image_size, cfg.channels, crop=aug.crop,
                        flip=aug.flip)
  train_idx, val_idx, test_idx = data_lib.split_rows(
      len(train_src), len(test_src), cfg)
  settings = dict(workers=cfg.workers,
                  checkpoint_every_steps=cfg.checkpoint_every_steps)
  streams = [Stream(train_src, transform, train_idx, **settings),
             Stream(train_src, transform, val_idx, **settings),
             Stream(test_src, transform, test_idx, **settings)]
  size = cfg.image_size ** 2 * cfg.channels * 4 * len(train_idx)
  stream = cfg.streaming == 'always' or (
      cfg.streaming == 'auto' and (
          aug.per_epoch or size > cfg.memory_limit_mb * 2 ** 20))
  if cfg.streaming == 'never' and aug.per_epoch:
    raise TCNError(f'config.data.augment={cfg.augment!r} crops or flips '
                   "per epoch, which needs config.data.streaming 'auto' or "
                   "'always'")
  if stream:
    parts = [data_lib.Split(s, s.labels) for s in streams]
  else:   # Decoded once, in order, through Grain (workers if any).
    shape = streams[0].shape[1:]
    parts = [data_lib.Split(np.concatenate(
        [np.zeros((0,) + shape, np.float32)]
        + [b['image'] for b in s.in_order(256)]), s.labels) for s in streams]
  return data_lib.Dataset(*parts, len(train_src.classes),
                          f'{root} ({"streamed" if stream else "in memory"})',
                          train_src.classes)


def load(cfg) -> data_lib.Dataset:
  """The dataset of data section `cfg`: an image folder through
  `load_folder` (streamed or decoded into memory), any other through
  `data.load` (in memory)."""
  return load_folder(cfg) if data_lib.is_folder(cfg) else data_lib.load(cfg)
