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
import atexit
import dataclasses
import hashlib
import io
import math
import os
import weakref

from absl import logging
import grain
import jax
import numpy as np

from tcn_jax import augment
from tcn_jax import data as data_lib
from tcn_jax.errors import TCNError


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


def _visible(names):
  """Directory entries but hidden ones ('.ipynb_checkpoints', '.DS_Store')."""
  return sorted(n for n in names if not n.startswith('.'))


def _is_image_file(path) -> bool:
  """Whether Pillow recognises `path` as an image (reads its header only)."""
  try:
    with _pil().open(path) as img:
      return bool(img.format)
  except Exception:  # pylint: disable=broad-except  (Pillow raises several)
    return False


def _check_linked_classes(root, field, found):
  """Class folders that are symbolic links: followed, but refused when the
  link is broken, points at `root` or above it (a loop), or names a
  directory another class folder is already (its images would be taken
  under two labels)."""
  for n in _visible(os.listdir(root)):
    path = os.path.join(root, n)
    if os.path.islink(path) and not os.path.exists(path):
      raise TCNError(f'{field} class folder {path!r} is a broken symbolic '
                     f'link (to {os.readlink(path)!r}); remove it or fix it')
  real_root, seen = os.path.realpath(root), {}
  for c in found:
    path = os.path.join(root, c)
    real = os.path.realpath(path)
    if real_root == real or real_root.startswith(real + os.sep):
      raise TCNError(f'{field} class folder {path!r} is a link to {real!r}, '
                     'which holds the class folders themselves; remove it')
    if real in seen:
      raise TCNError(f'{field} class folders {seen[real]!r} and {c!r} are '
                     f'the same directory {real!r} (a symbolic link): its '
                     'images would be in two classes; remove one')
    seen[real] = c


class ImageFolderSource:
  """A folder with one sub-folder per class of JPEG/PNG files (ImageNet's
  layout): classes are the sorted sub-folder names, labels their index;
  record i = {'encoded': the file's bytes, 'label', 'path'}. Hidden entries
  (names starting with '.', e.g. .ipynb_checkpoints) are ignored; a class
  folder without images, and a training folder of fewer than 2 classes,
  are refused. A class folder may be a symbolic link to a directory
  elsewhere (followed, as its own class); a broken link, a link to the
  folder itself or above it, and two class names for one directory (the
  same images under two labels) are refused.

  Args:
    root: the folder.
    field: the config field that named it (for errors).
    classes: the class names to use (e.g. train's for a test folder); by
      default the sub-folders found.
    bad_images: 'stop' (an image that does not decode is one error naming
      it) or 'skip' (files Pillow does not recognise are left out here,
      counted in `skipped`; a truncated image decodes as far as it goes).
  """

  def __init__(self, root: str, field: str = 'config.data.dir',
               classes=None, bad_images: str = 'stop'):
    if not os.path.isdir(root):
      raise TCNError(f'{field} {root!r} is not a directory')
    try:
      found = [d for d in _visible(os.listdir(root))
               if os.path.isdir(os.path.join(root, d))]
      _check_linked_classes(root, field, found)
    except OSError as e:
      raise TCNError(f'{field} {root!r} cannot be listed: {e.strerror}'
                     ) from None
    if not found:
      raise TCNError(f'{field} {root!r} holds no class sub-folders (one '
                     'folder of images per class)')
    self.classes = list(classes) if classes is not None else found
    extra = sorted(set(found) - set(self.classes))
    if extra:
      raise TCNError(f'{field} {root!r} has classes that the training folder '
                     f'has not: {extra[:3]}')
    if classes is None and len(found) < 2:
      raise TCNError(f'{field} {root!r} holds {len(found)} class folder '
                     f'({found[0]!r}); a classifier needs at least 2 (one '
                     'sub-folder of images per class)')
    index = {c: i for i, c in enumerate(self.classes)}
    names, labels, self.skipped = [], [], []
    for c in found:
      folder = os.path.join(root, c)
      try:
        here = [n for n in _visible(os.listdir(folder))
                if n.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(folder, n))]
      except OSError as e:
        raise TCNError(f'{field} class folder {folder!r} cannot be listed: '
                       f'{e.strerror}') from None
      if bad_images == 'skip':
        bad = [n for n in here if not _is_image_file(os.path.join(folder, n))]
        self.skipped += [os.path.join(folder, n) for n in bad]
        here = [n for n in here if n not in set(bad)]
      if not here:
        raise TCNError(f'{field} class folder {folder!r} holds no JPEG or '
                       'PNG images; remove it or add its images')
      names += [os.path.join(c, n).encode() for n in here]
      labels += [index[c]] * len(here)
    if not names:
      raise TCNError(f'{field} {root!r} holds no JPEG or PNG images in its '
                     'class sub-folders')
    self.root, self.bad_images = root, bad_images
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
    path = self.path(i)
    try:
      with open(path, 'rb') as f:
        encoded = f.read()
    except OSError as e:
      raise TCNError(f'cannot read image {path}: {e.strerror}') from None
    return {'encoded': encoded, 'label': self.labels[i], 'path': path,
            'truncated_ok': self.bad_images == 'skip'}

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
      image = self._decode_file(record)
    else:
      image = np.asarray(record['image'])
    if image.ndim == 2:
      image = image[..., None]
    if self.channels == 3 and image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    elif self.channels == 1 and image.shape[-1] == 3 and image.dtype == np.uint8:
      image = np.asarray(_pil().fromarray(image).convert('L'))[..., None]
    return image

  def _decode_file(self, record) -> np.ndarray:
    """An encoded file's pixels; TCNError naming the file (`path`) when it
    is not an image Pillow decodes."""
    from PIL import ImageFile  # pylint: disable=g-import-not-at-top
    image_cls = _pil()
    try:
      img = image_cls.open(io.BytesIO(record['encoded']))
      if self.image_size and img.format == 'JPEG':
        img.draft('RGB' if self.channels != 1 else 'L',
                  (self.image_size, self.image_size))
      mode = {1: 'L', 3: 'RGB'}.get(self.channels) or (
          'L' if img.mode in ('L', 'I;16', '1') else 'RGB')
      old = ImageFile.LOAD_TRUNCATED_IMAGES
      ImageFile.LOAD_TRUNCATED_IMAGES = bool(record.get('truncated_ok'))
      try:
        return np.asarray(img.convert(mode))
      finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    except (OSError, ValueError, SyntaxError, image_cls.DecompressionBombError,
            EOFError) as e:
      where = record.get('path', f'record {record.get("index", "?")}')
      cause = (str(e).splitlines() or [type(e).__name__])[0]
      if 'BytesIO' in cause:
        cause = 'not an image Pillow recognises'
      raise TCNError(f'cannot decode image {where}: {cause[:160]}; fix or '
                     'remove it, or set --config.data.bad_images=skip to '
                     'leave such files out') from None

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
    if self.workers:   # Batches come back pickled through a pipe, not in
      # shared memory: a block Grain has in flight when an iterator is
      # closed mid-epoch (Ctrl-C) can outlive the run (the resource tracker
      # then warns of it), and a pipe costs one copy of the batch.
      it = grain.experimental.WithOptionsIterDataset(
          it, grain.experimental.DatasetOptions(min_shm_size=NO_SHARED_MEMORY))
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
    it = _tracked(lambda: iter(self._dataset(order, train, seed, epoch, local,
                                             True)), self.workers)
    if state is not None:
      it.set_state(state)
    return it

  def in_order(self, batch_size: int):
    """Eval-transformed batches of the whole split in order (the last one
    smaller): for features and evaluation."""
    return _tracked(lambda: iter(self._dataset(
        np.arange(len(self)), False, 0, 0, batch_size, False)), self.workers)


# Iterators with Grain worker processes that are still open: closed on every
# exit path (`close_iterators`: at exit, and by `main` before it ends the
# process), so no worker, semaphore or shared-memory block outlives a run.
_OPEN = weakref.WeakSet()


class _SigintBlocked:
  """SIGINT blocked in this thread while inside: a process or thread it
  starts inherits the block. Grain's worker processes are started inside
  (`_Workers`), so Ctrl-C (SIGINT to the whole process group) reaches only
  the main process, which stops them (`close_iterators`) instead of each
  dying mid-import or mid-batch and leaking semaphores and shared memory.
  A SIGINT that arrives meanwhile is delivered on leaving."""

  def __enter__(self):
    import signal  # pylint: disable=g-import-not-at-top
    self._old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

  def __exit__(self, *exc):
    import signal  # pylint: disable=g-import-not-at-top
    signal.pthread_sigmask(signal.SIG_SETMASK, self._old)


# Grain's `min_shm_size` above which worker batches would travel in shared
# memory: none does.
NO_SHARED_MEMORY = 1 << 62


class _Workers:
  """A Grain iterator with worker processes: every step runs with SIGINT
  blocked (`_SigintBlocked`); get_state, set_state and close pass through."""

  def __init__(self, make):
    with _SigintBlocked():
      self._it = make()

  def __iter__(self):
    return self

  def __next__(self):
    with _SigintBlocked():
      return next(self._it)

  def __getattr__(self, name):
    return getattr(self._it, name)


def _tracked(make, workers: int):
  """`make()`'s iterator; with worker processes, guarded and registered."""
  if not workers:
    return make()
  it = _Workers(make)
  _OPEN.add(it)
  return it


def close_iterators():
  """Closes every open iterator of Grain worker processes (idempotent)."""
  for it in list(_OPEN):
    try:
      it.close()
    except Exception:  # pylint: disable=broad-except  (already torn down)
      pass
    _OPEN.discard(it)


atexit.register(close_iterators)


def release_workers():
  """Before a process ends without Python's exit handlers (`os._exit`, as
  `main` does): every worker iterator closed, and the semaphores and
  shared memory of the ones already dropped released, so the resource
  tracker has nothing left to warn about."""
  import gc  # pylint: disable=g-import-not-at-top
  from multiprocessing import util  # pylint: disable=g-import-not-at-top
  close_iterators()
  gc.collect()   # Dropped iterators: their finalizers unlink what they own.
  try:   # Batches in shared memory are unlinked by a thread pool: wait.
    from grain._src.python.ipc import shared_memory_array as sma  # pylint: disable=g-import-not-at-top
    pool = sma.SharedMemoryArray._del_thread_pool  # pylint: disable=protected-access
    if pool is not None:
      sma.SharedMemoryArray._disable_async_del()  # pylint: disable=protected-access
      pool.close()
      pool.join()
  except (ImportError, AttributeError):   # Another Grain version.
    pass
  util._exit_function()  # pylint: disable=protected-access  (atexit's own)


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


class StackedRows:
  """(members, N, ...) targets stacked from per-member (N, ...) arrays, only
  where a batch reads them: memory-mapped features stay on disk.

  Has what the training loop uses of an array: shape, ndim, dtype and
  `take(index, axis=1)` (what np.take calls)."""

  RELEASE_EVERY = 64   # Batches between dropping read pages (see take).

  def __init__(self, parts):
    self.parts = list(parts)
    first = self.parts[0]
    self.shape = (len(self.parts),) + tuple(first.shape)
    self.ndim, self.dtype = len(self.shape), first.dtype
    self._reads = 0

  def take(self, indices, axis=None, out=None, mode='raise'):
    """The rows `indices` of every part, stacked. Every RELEASE_EVERY calls
    the pages read from memory-mapped parts are dropped from this process
    (madvise DONTNEED; the OS's file cache keeps them), so resident memory
    does not grow with the file over an epoch."""
    del out, mode
    if axis != 1:
      raise ValueError('StackedRows are read by rows (axis 1)')
    rows = np.stack([np.asarray(p[np.asarray(indices)]) for p in self.parts])
    self._reads += 1
    if self._reads % self.RELEASE_EVERY == 0:
      for p in self.parts:
        data_lib.drop_pages(p)
    return rows


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
                                'config.data.dir train/',
                                bad_images=cfg.bad_images)
  test_dir = next(os.path.join(root, n) for n in ('test', 'val')
                  if os.path.isdir(os.path.join(root, n)))
  test_src = ImageFolderSource(test_dir, f'config.data.dir '
                               f'{os.path.basename(test_dir)}/',
                               classes=train_src.classes,
                               bad_images=cfg.bad_images)
  skipped = train_src.skipped + test_src.skipped
  if skipped:
    logging.warning('config.data.bad_images=skip: left out %d files that are '
                    'not images, e.g. %s', len(skipped), skipped[0])
  image_size, channels = data_lib.folder_shape(cfg)
  transform = Transform(image_size, channels, crop=aug.crop, flip=aug.flip)
  train_idx, val_idx, test_idx = data_lib.split_rows(
      len(train_src), len(test_src), cfg)
  settings = dict(workers=cfg.workers,
                  checkpoint_every_steps=cfg.checkpoint_every_steps)
  streams = [Stream(train_src, transform, train_idx, **settings),
             Stream(train_src, transform, val_idx, **settings),
             Stream(test_src, transform, test_idx, **settings)]
  size = image_size ** 2 * channels * 4 * len(train_idx)
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
