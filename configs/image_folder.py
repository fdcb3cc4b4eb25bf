"""Your own images: a folder with train/ and test/ (or val/) sub-folders,
each with one sub-folder of JPEG/PNG images per class (ImageNet's layout).

  python -m tcn_jax.main --config configs/image_folder.py \\
      --config.data.dir=/path/to/folder --workdir runs/mine

Class names and count come from train/'s sub-folders; the validation split
(data.val_fraction) is carved from train with data.split_seed. Images are
decoded, resized (shorter side) and centre-cropped to data.image_size with
data.channels (1 grey, 3 RGB). data.augment='crop_flip' trains on random-
resized crops and flips (per epoch, seeded), 'flip' on flips only.

The splits are held in memory when the decoded train split fits in
data.memory_limit_mb and no augmentation is asked for (the fast path);
otherwise (or with data.streaming='always') they are read while training
through Grain (`tcn_jax.input_pipeline`), with data.workers decoding
processes, and data.checkpoint_every_steps > 0 saves mid-epoch checkpoints.
Presets: ':smoke' (small images and networks, a pipeline check).
"""
from tcn_jax import config as config_lib
from tcn_jax import presets


def get_config(preset: str = ''):
  c = config_lib.base_config()
  c.num_students = 2
  c.data.name = 'image_folder'
  # The image-folder fields (channels, augment, streaming, memory_limit_mb,
  # workers, checkpoint_every_steps) keep base_config's values.
  c.data.image_size, c.data.val_fraction = 64, 0.1
  t, s = c.teacher, c.students
  t.body = 'C32 MP C64 MP C128 MP C128 MP F D256r'
  t.epochs = 30
  s.arch = 'C16 MP C32 MP C32 MP F D32r Do.3'
  s.epochs = 20
  s.features = 'auto'   # Online when augmented or too large; logged.
  c.eval_batch_size = 250
  return presets.apply(c, preset, extra={'smoke': _smoke})


def _smoke(c):
  """Small images and networks, short schedules: a pipeline check."""
  c.data.image_size = 16
  c.teacher.body = 'C8 MP C8 MP F D32r'
  c.students.arch = 'C4 MP F D8r'
  c.teacher.epochs = c.students.epochs = c.head.epochs = 2
  c.teacher.batch_size = c.students.batch_size = c.head.batch_size = 16
  c.kd.batch_size = 16
  c.data.val_fraction = 0.2
