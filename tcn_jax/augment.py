"""Augmentations of the training images, by name (`config.data.augment`).

One registry serves both ways the data reaches training:
- in memory: `mirror` makes the training set the images plus their left-right
  mirrors, with the teacher's features of both (computed once, cached);
- streamed (`input_pipeline.Stream`): `flip` and `crop_flip` change each
  image every epoch (seeded by (seed, epoch, row)), in `input_pipeline.
  Transform`, so the teacher's features are computed online.

and a third way, for the students (`config.students.views`) and the head
(`config.head.views`):
- on device: `view` changes every training batch inside the compiled step
  (a padded random crop, a flip, mixup between the batch's images, and
  their labels for the head), and the frozen teacher's features (the
  frozen students' outputs, for the head) are computed online from the
  same view ("consistent" distillation, Beyer et al. 2022). In-memory data
  stay on device; a streamed split is viewed chunk by chunk the same way.

A new augmentation is one `AUGMENTATIONS.register` here (what it does to an
in-memory set, the Transform's flags it sets, or its fields `view` reads)
and its use in `input_pipeline.Transform.train` if it changes streamed
images per epoch.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tcn_jax.errors import TCNError
from tcn_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """What one augmentation does.

  Attributes:
    description: one line (shown in "choose one of" errors and docs).
    mirrored_copies: in memory: train on the images and their mirrors (the
      teacher's features of both, cached).
    crop: streamed: a random-resized crop per epoch.
    flip: a random left-right flip per image (streamed: per epoch; on
      device: per step).
    pad: on device: a random crop of the image padded by this fraction of
      its height (0.125: 4 pixels of 32, 3 of 28) on every side.
    mixup: on device: every image mixed with the next one of its batch
      (rolled by one) by a weight drawn per batch from Beta(mixup, mixup)
      (0: none), as big_vision's `utils.mixup` with n=2.
  """
  description: str
  mirrored_copies: bool = False
  crop: bool = False
  flip: bool = False
  pad: float = 0.0
  mixup: float = 0.0

  @property
  def per_epoch(self) -> bool:
    """Whether images change every epoch (needs a streamed split)."""
    return self.crop or self.flip

  @property
  def on_device(self) -> bool:
    """Whether `view` can draw it on device (config.students.views)."""
    return not (self.mirrored_copies or self.crop)


AUGMENTATIONS = Registry('augmentation', 'data.augment')
AUGMENTATIONS.register('', Augmentation('none (the paper)'))
AUGMENTATIONS.register('mirror', Augmentation(
    'the training set plus its left-right mirrors, with the teacher\'s '
    'features of both (in memory; not in the paper)', mirrored_copies=True))
AUGMENTATIONS.register('flip', Augmentation(
    'a random left-right flip (data.augment: per epoch, streamed image '
    'folders; students.views: per step, on device)', flip=True))
AUGMENTATIONS.register('crop_flip', Augmentation(
    'a random-resized crop and flip per epoch (streamed image folders)',
    crop=True, flip=True))
AUGMENTATIONS.register('pad_crop_flip', Augmentation(
    'a random crop of the image padded by 1/8 of its height, and a flip '
    '(students.views: per step, on device)', flip=True, pad=0.125))
AUGMENTATIONS.register('mixup', Augmentation(
    'mixup between the images of a batch alone (weight from Beta(1, 1); '
    'students.views: per step, on device)', mixup=1.0))
AUGMENTATIONS.register('pad_crop_flip_mixup', Augmentation(
    'pad_crop_flip, then mixup between the images of a batch (weight from '
    'Beta(1, 1); students.views: per step, on device)', flip=True,
    pad=0.125, mixup=1.0))


def get(name: str) -> Augmentation:
  """The augmentation `name` (TCNError naming config.data.augment)."""
  return AUGMENTATIONS.get(name)


def hflip(x: np.ndarray) -> np.ndarray:
  """Left-right mirror images of an in-memory (N, H, W, C) batch."""
  if not isinstance(x, np.ndarray):   # A streamed split.
    raise TCNError("config.data.augment='mirror' needs the data in memory; "
                   "a streamed image folder flips with "
                   "config.data.augment='flip'")
  if x.ndim != 4:
    raise TCNError("config.data.augment='mirror' needs images (N, H, W, C); "
                   f'this dataset gives inputs of shape {x.shape[1:]}')
  return x[:, :, ::-1]


def key_name(name: str) -> str:
  """The augmentation as the features and students stage keys name it
  ('flip' for mirrored copies, as when it was `students.augment`; '' for
  none or for a per-epoch one, which the data's key already holds)."""
  return 'flip' if get(name).mirrored_copies else ''


def check_view(name: str, field: str = 'config.students.views'
               ) -> Augmentation:
  """The augmentation `name` for `field` (students.views, head.views):
  TCNError unless it can be drawn on device."""
  aug = AUGMENTATIONS.get(name)
  if not aug.on_device:
    on_device = [n for n in AUGMENTATIONS.names()
                 if n and AUGMENTATIONS.get(n).on_device]
    raise TCNError(f'{field}={name!r} cannot be drawn on device; choose one '
                   f'of {on_device} (or data.augment for the whole run\'s '
                   'images)')
  return aug


# The views' random stream, apart from the members' (init, dropout).
VIEW_STREAM = 0x76696577


def view_seed(stage_seed: int) -> int:
  """The seed of a stage's views (`view`'s keys: (it, epoch, step))."""
  return int(np.random.SeedSequence([stage_seed, VIEW_STREAM])
             .generate_state(1)[0])


def view(aug: Augmentation, key: jax.Array, x: jax.Array,
         targets: dict | None = None) -> tuple[jax.Array, dict]:
  """A random view of the batch x (B, H, W, C) on device, drawn from `key`
  (the same key gives the same view: the teacher's features and every
  student see it): `aug`'s padded crop, flip, then mixup. Returns (view,
  targets): with mixup, targets (members, B) 'label' gain 'mixed_label'
  (the labels of the images mixed in) and 'mix_weight' (the weight of
  'label'), for `losses.classification`; other targets are unchanged."""
  targets = dict(targets or {})
  k_crop, k_flip, k_mix = jax.random.split(key, 3)
  b, h, w, _ = x.shape
  if aug.pad:
    p = max(1, int(round(h * aug.pad)))
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    dy, dx = jnp.split(jax.random.randint(k_crop, (b, 2), 0, 2 * p + 1), 2, 1)
    x = jax.vmap(lambda im, y0, x0: jax.lax.dynamic_slice(
        im, (y0, x0, 0), (h, w, x.shape[3])))(padded, dy[:, 0], dx[:, 0])
  if aug.flip:
    flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)
  if aug.mixup:
    lam = jax.random.beta(k_mix, aug.mixup, aug.mixup).astype(x.dtype)
    x = lam * x + (1 - lam) * jnp.roll(x, 1, axis=0)
    if 'label' in targets:
      targets['mixed_label'] = jnp.roll(targets['label'], 1, axis=1)
      targets['mix_weight'] = jnp.full(targets['label'].shape, lam,
                                       jnp.float32)
  return x, targets
