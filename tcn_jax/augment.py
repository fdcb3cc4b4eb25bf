"""Augmentations of the training images, by name (`config.data.augment`).

One registry serves both ways the data reaches training:
- in memory: `mirror` makes the training set the images plus their left-right
  mirrors, with the teacher's features of both (computed once, cached);
- streamed (`input_pipeline.Stream`): `flip` and `crop_flip` change each
  image every epoch (seeded by (seed, epoch, row)), in `input_pipeline.
  Transform`, so the teacher's features are computed online.

A new augmentation is one `AUGMENTATIONS.register` here (what it does to an
in-memory set, or the Transform's flags it sets) and its use in
`input_pipeline.Transform.train` if it changes images per epoch.
"""
import dataclasses

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
    flip: streamed: a random left-right flip per epoch.
  """
  description: str
  mirrored_copies: bool = False
  crop: bool = False
  flip: bool = False

  @property
  def per_epoch(self) -> bool:
    """Whether images change every epoch (needs a streamed split)."""
    return self.crop or self.flip


AUGMENTATIONS = Registry('augmentation', 'data.augment')
AUGMENTATIONS.register('', Augmentation('none (the paper)'))
AUGMENTATIONS.register('mirror', Augmentation(
    'the training set plus its left-right mirrors, with the teacher\'s '
    'features of both (in memory; not in the paper)', mirrored_copies=True))
AUGMENTATIONS.register('flip', Augmentation(
    'a random left-right flip per epoch (streamed image folders)',
    flip=True))
AUGMENTATIONS.register('crop_flip', Augmentation(
    'a random-resized crop and flip per epoch (streamed image folders)',
    crop=True, flip=True))


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
