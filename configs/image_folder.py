"""Your own images: a folder with train/ and test/ (or val/) sub-folders,
each with one sub-folder of JPEG/PNG images per class (ImageNet's layout).

  python -m tcn_jax.main --config configs/image_folder.py \\
      --config.data.dir=/path/to/folder --workdir runs/mine

Class names and count come from train/'s sub-folders; the validation split
(data.val_fraction) is carved from train with data.split_seed. Images are
decoded, resized (shorter side) and centre-cropped to data.image_size with
data.channels (1 grey, 3 RGB); left unset (0) they follow a Keras teacher
file's input (teacher.init_from=model.keras), else 64x64 RGB. The teacher's
and students' default architectures ('auto') have as many conv + pooling
stages as the image size allows (students end 4x4 or wider). data.augment='crop_flip' trains on random-
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
  # image_size, channels 0: a Keras teacher file's input
  # (teacher.init_from), else 64x64 RGB (config.resolve); the other
  # image-folder fields keep base_config's values.
  c.data.image_size, c.data.channels, c.data.val_fraction = 0, 0, 0.1
  t, s = c.teacher, c.students
  # 'auto': conv + pooling stages sized to data.image_size (config.
  # auto_arch): at 64x64 'C32 MP C64 MP C128 MP C128 MP F D256r' (2x2) and
  # 'C16 MP C32 MP C32 MP F D32r Do.3' (6x6); at 28x28 two stages each.
  t.body = 'auto'
  t.epochs = 30
  s.arch = 'auto'
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
