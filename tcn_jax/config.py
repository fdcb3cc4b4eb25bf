"""The run's config: the paper's base, resolved and validated once.

A user's config (a `configs/*.py` file plus `--config.*` overrides) may leave
per-n fields unset ('' or -1) to take the paper's value for `num_students`
from the field's `<field>_by_n` table. `resolve` turns it into the config a
run uses: every per-n value chosen, the tables dropped, every value and name
checked (names through the registries, with a "choose one of" error). The
workdir's `config.json` is the resolved config, so nothing downstream (the
stages, experiments, tables) derives a value again; `upgrade` reads the
config.json of a run made before a field existed as today's fields.

This module is data and checks: it imports only light modules (the name
registries and parsers: no checkpointing, no input pipeline, no training
loop), so loading a `configs/*.py` file imports neither Orbax nor Grain.
"""
import copy
import json
import math

import ml_collections

from tcn_jax import augment
from tcn_jax import chunking
from tcn_jax import data as data_lib
from tcn_jax import distributed
from tcn_jax import formats
from tcn_jax import gan as gan_lib
from tcn_jax import layers
from tcn_jax import losses
from tcn_jax import mesh as mesh_lib
from tcn_jax import models
from tcn_jax import optim
from tcn_jax.errors import TCNError
from tcn_jax.registry import Registry

# Fields that take the paper's value for n from `<field>_by_n` when unset.
PER_N = ('students.arch', 'students.epochs', 'head.epochs', 'head.optimizer',
         'head.dropout', 'gan.disc', 'gan.g_steps_per_d_step', 'kd.arch')
UNSET = ('', -1, -1.0, None)
METHODS = Registry('method', 'method')
METHODS.register('ff', 'regression loss only (paper: FF)')
METHODS.register('gan', 'adversarial + regression loss (paper: GAN)')
STRATEGIES = Registry('strategy', 'students.strategy')
STRATEGIES.register('auto', 'unrolled on CPU, vmap elsewhere')
STRATEGIES.register('vmap', 'the members of a group in one vmapped program')
STRATEGIES.register('unrolled', 'the members one after another in a program')
STRATEGIES.register('sharded', "vmap, every device on the mesh's students axis")
FEATURE_MODES = Registry('features mode', 'students.features')
FEATURE_MODES.register('', 'cached (the default)')
FEATURE_MODES.register('cached', 'computed once, memory-mapped when streamed')
FEATURE_MODES.register('online', "the frozen teacher in the students' step")
FEATURE_MODES.register('auto', 'cached when they fit and nothing augments')


def _registry(what, field, names):
  registry = Registry(what, field)
  for name in names:
    registry.register(name, name)
  return registry


DATASETS = _registry('dataset', 'data.name', data_lib.DATASETS)
LAYERS_IMPLS = _registry('layers_impl', 'layers_impl', layers.IMPLS)
INITS = _registry('initializer', 'students.init', models.INITS)
DTYPES = _registry('compute dtype', 'dtype', models.COMPUTE_DTYPES)
GAN_MSE_TARGETS = _registry('GAN MSE target', 'gan.mse_target',
                            gan_lib.MSE_TARGETS)

# Fashion-MNIST student trunks per n (reference Sec. 3); the output Dense of
# the chunk's width is appended by the library.
STUDENTS_FMNIST = {
    '1': 'C32 C32 MP C16 C16 MP Do.25 F D64r Do.3',
    '2': 'C32 C32 MP C16 C16 MP Do.25 F D16r Do.3',
    '4': 'C32 C32 MP C16 C16 MP Do.25 F D16r Do.3',
    '8': 'C32 C32 MP C16 C16 MP Do.25 F D16r Do.3',
}


# Teachers given from outside (tcn_jax/given_teacher.py): their teacher
# fields and defaults.
GIVEN_FIELDS = {'features_from': '', 'feature_tensor': '', 'input_layout': '',
                'input_mean': '', 'input_std': '', 'allow_chance': False,
                'keras_mode': ''}
KERAS_MODES = ('', 'model', 'body')


def input_mismatch(config, want, got, path: str) -> str:
  """'' when inputs of shape `got` (H, W, C) fit a teacher taking `want`
  (None: any size), else one line naming the field to change."""
  if want is None or len(want) != len(got):
    return ''
  name = path.rsplit('/', 1)[-1]
  folder = 'image_size' in config.data and len(got) == 3
  if folder and want[-1] is not None and want[-1] != got[-1]:
    s = '' if want[-1] == 1 else 's'
    return (f'data.channels={got[-1]} but the teacher {name} takes '
            f'{want[-1]} channel{s}; set --config.data.channels={want[-1]}')
  if folder and any(w is not None and w != g
                    for w, g in zip(want[:2], got[:2])):
    size = want[0] if want[0] == want[1] else max(w or 0 for w in want[:2])
    return (f'data.image_size={got[0]} but the teacher {name} takes '
            f'{want[0]}x{want[1]} images; set '
            f'--config.data.image_size={size}')
  if any(w is not None and w != g for w, g in zip(want, got)):
    return (f'the data ({config.data.name}) has inputs of shape '
            f'{tuple(got)}, the teacher {name} takes '
            f'{tuple(w for w in want)}: give data of its input shape')
  return ''



def base_config() -> ml_collections.ConfigDict:
  """The paper's Fashion-MNIST setup (n = 4 FF students), which the other
  datasets' configs change: every field a run reads, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_students = 4
  c.method = 'ff'
  c.layers_impl = 'auto'          # 'auto' | 'im2col' | 'xla'.
  # Forward-only work of the stages (teacher features and evaluation, the
  # frozen students of head fine-tuning): '' = layers_impl (as training),
  # 'auto' = 'xla' (XLA's own convolution: faster without a backward pass on
  # the CPU; changes the features' last bits, hence the digests), 'im2col'.
  c.forward_impl = ''
  # Compute dtype of the teacher, the students and the KD students
  # (parameters and optimizer state stay float32): 'float32' | 'bfloat16'.
  c.dtype = 'float32'
  c.eval_batch_size = 1000
  c.allow_config_change = False
  # 'contiguous' (the paper) or 'pca': students regress chunks of principal-
  # component coefficients ('ordered' by variance, or variance-'balanced').
  c.chunking = 'contiguous'
  c.pca_assignment = 'balanced'
  c.data = ml_collections.ConfigDict(dict(
      name='fashion_mnist', dir='', split_seed=0, val_fraction=0.2,
      train_size=0, test_size=0,
      # Images resized (shorter side) and centre-cropped to image_size
      # (ImageNet, image folders).
      image_size=data_lib.IMAGE_SIZE,
      vocab_size=data_lib.VOCAB_SIZE, max_len=data_lib.MAX_LEN,   # IMDB.
      # Augmentation of the training images by name (tcn_jax/augment.py):
      # '' (the paper), 'mirror' (in memory: the images and their mirrors),
      # 'flip' / 'crop_flip' (per epoch: a streamed image folder).
      augment='',
      # Image folders (name='image_folder', or layout='folder' for a
      # dataset's folder copy): channels 1 (grey) or 3 (RGB); streaming
      # 'auto' (when train is over memory_limit_mb or augment changes images
      # per epoch), 'always' or 'never'; Grain decoding worker processes; a
      # mid-epoch checkpoint every K steps (0: at epoch ends).
      layout='', channels=3, streaming='auto', memory_limit_mb=1024,
      workers=0, checkpoint_every_steps=0,
      # An image that does not decode: 'stop' (one error naming the file)
      # or 'skip' files that are not images.
      bad_images='stop'))
  # init_from: a workdir of this library (its teacher/), a teacher
  # checkpoint directory, a Keras model file (.keras, .h5) or an ONNX file
  # (.onnx): that trained teacher is used, none is trained.
  c.teacher = ml_collections.ConfigDict(dict(
      body='C32 C64 MP Do.25 F D256r D256r', head_dropout=0.5, head_bn=False,
      optimizer='adam', learning_rate=1e-3, weight_decay=0.0, batch_size=256,
      epochs=20, lr_step_epochs=0, lr_step_factor=0.5, init_from='',
      # Given teachers (tcn_jax.given_teacher, docs/onnx_teacher.md):
      # features_from: a directory of precomputed features.{train,val,test}
      # .npy and head.npz; for an ONNX init_from: feature_tensor (default:
      # the final Gemm/MatMul's input), input_layout ('' = auto: NCHW when the
      # graph's input is (C, H, W); 'NCHW', 'NHWC'), input_mean / input_std
      # ('0.485,0.456,0.406': per channel; '' = unchanged); allow_chance:
      # distill a given teacher whose validation accuracy is near chance;
      # keras_mode, for a Keras init_from: 'model' (the file taken whole,
      # any architecture; teacher.body unused), 'body' (its weights mapped
      # onto teacher.body layer for layer), '' (auto: 'body' for a
      # weights-only file, else 'model').
      features_from='', feature_tensor='', input_layout='',
      input_mean='', input_std='', allow_chance=False, keras_mode=''))
  c.students = ml_collections.ConfigDict(dict(
      arch='', arch_by_n=dict(STUDENTS_FMNIST), init='normal', out_relu=False,
      optimizer='adam', learning_rate=1e-3, weight_decay=0.0, batch_size=128,
      # lr_schedule: by name (tcn_jax/optim.py), 'constant' (the paper) or
      # 'cosine'.
      epochs=10, strategy='auto', lr_schedule='constant',
      # The regression loss by name (losses.STUDENT_LOSSES); '' = the
      # paper's 'mse', or 'logit_matching' when logit_weight > 0.
      loss='',
      # The teacher's features of the training images: 'cached' (computed
      # once; '' is 'cached'), 'online' (inside the students' step, on the
      # same, possibly augmented, batch) or 'auto' (cached when they fit in
      # data.memory_limit_mb and no augmentation is used; logged).
      features='',
      # The students' own views ('' = the training images as they come): an
      # augmentation drawn on device per step, by name (tcn_jax/augment.py:
      # 'flip', 'pad_crop_flip', 'mixup', 'pad_crop_flip_mixup'); the
      # teacher's features are then computed online from the same view (preset
      # 'consistent'). In memory or streamed; the teacher is unchanged.
      views='',
      # After each student epoch, the assembled TCN with the teacher's frozen
      # head scored on val and test (history and results.json
      # 'students_curve': patience curves; recipes are chosen on val). Needs
      # identical student architectures; trains the same.
      eval_tcn=False,
      # Not in the paper (off): + logit_weight * T^2 * KL between the
      # teacher's logits and its frozen head on the feature with this
      # student's chunk swapped in (losses.logit_matching).
      logit_weight=0.0, logit_temperature=2.0))
  c.head = ml_collections.ConfigDict(dict(
      dropout=-1.0, dropout_by_n={'1': 0.5, '2': 0.5, '4': 0.5, '8': 0.3},
      optimizer='', optimizer_by_n={'1': 'adam', '2': 'adam', '4': 'adam',
                                    '8': 'nadam'},
      learning_rate=1e-3, batch_size=128, keep_teacher_bn=False,
      epochs=-1, epochs_by_n={'1': 5, '2': 30, '4': 20, '8': 10},
      # The head's own views ('' = the training images as they come): an
      # augmentation drawn on device per step (as students.views), the
      # frozen students' outputs computed from each view, mixup's labels
      # mixed as its images. Validation and test are never viewed.
      views=''))
  # GAN students (method='gan'). Discriminator widths per n (reference
  # Sec. 4).
  c.gan = ml_collections.ConfigDict(dict(
      disc='', disc_by_n={'1': '64 128 256 512 1024', '2': '64 128 256 512 1024',
                          '4': '64 128 256 512', '8': '64 128 256 512 1024'},
      disc_first_bias=False, recon_relu=False, mse_target='student_output',
      adv_weight=1.0, mse_weight=1.0, g_steps_per_d_step=1,
      d_optimizer='adam', d_learning_rate=2e-4))
  # Hinton KD baseline (paper Table 3): one student with about the total
  # parameters of the n TCN students. T and alpha are not in the paper.
  c.kd = ml_collections.ConfigDict(dict(
      enabled=False, arch='', arch_by_n={
          '1': 'C32 C32 MP C16 C16 MP Do.25 F D124r Do.3',   # 49,630 params
          '2': 'C32 C32 MP C16 C16 MP Do.25 F D109r Do.3',   # 45,625
          '4': 'C32 C32 MP C16 C16 MP Do.25 F D263r Do.3',   # 86,743
          '8': 'C32 C32 MP C16 C16 MP Do.25 F D572r Do.3'},  # 169,246
      temperature=4.0, alpha=0.9, optimizer='adam', learning_rate=1e-3,
      weight_decay=0.0, batch_size=128, epochs=10))
  # KDGAN baseline (Wang et al. 2018; what is built: tcn_jax/kdgan.py): the
  # KD student (kd.arch, T, alpha, optimizer) plus a discriminator over
  # [teacher feature, label] pairs.
  c.kdgan = ml_collections.ConfigDict(dict(
      enabled=False, epochs=10, adv_weight=0.1, gumbel_temperature=1.0,
      disc='256 128', d_optimizer='adam', d_learning_rate=2e-4))
  # Artifacts of the assembled TCN and of each student written into
  # workdir/export/ at the end of a run (tcn_jax/export.py): formats
  # 'stablehlo', 'onnx' comma-separated ('' = none); batch_size 0 = any.
  c.export = ml_collections.ConfigDict(dict(formats='', batch_size=0))
  # Processes of a multi-host run (docs/distributed.md); num_processes=0:
  # detected from the cluster (SLURM, Cloud TPU, Kubernetes); timeout_s
  # bounds the join (the coordinator reachable, every process joined).
  c.distributed = ml_collections.ConfigDict(dict(
      num_processes=1, process_id=0, coordinator='', timeout_s=300))
  # The device mesh every stage runs on (tcn_jax/mesh.py): devices along
  # 'data' (batches) and 'students' (a group's members); -1: those left.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, students=1))
  return c


def _choose(config, path, n, needed):
  """Sets `config.<path>` to the paper's value for n when unset; drops the
  `_by_n` table. An unset field without a value for n fails if `needed`."""
  *parents, field = path.split('.')
  section = config
  for p in parents:
    section = section[p]
  table = section.get(field + '_by_n') or {}
  if field + '_by_n' in section:
    del section[field + '_by_n']
  if section[field] not in UNSET or not table:
    return
  if str(n) in table:
    try:
      section[field] = table[str(n)]
    except TypeError:   # The table's value is of another type than the field.
      raise TCNError(f'config.{path}_by_n.{n} must be of the type of '
                     f'config.{path} ({type(section[field]).__name__}), got '
                     f'{table[str(n)]!r}') from None
  elif needed:
    raise TCNError(f'no {field} for num_students={n}: set --config.{path} '
                   f'(paper values exist for n in {sorted(table, key=int)})')


def resolve(user: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The resolved, validated copy of a config (idempotent).

  Args:
    user: a config as `configs/*.py` give it (or `base_config()`), with
      overrides; per-n fields may be unset ('' or -1).

  Returns:
    A new config with every per-n value chosen for `num_students` and the
    `*_by_n` tables dropped. Raises TCNError naming the field of the first
    value that cannot work.
  """
  if not isinstance(user, ml_collections.ConfigDict):
    raise TCNError('the config must be an ml_collections.ConfigDict (what a '
                   f"config file's get_config returns), got "
                   f'{type(user).__name__}')
  c = ml_collections.ConfigDict(copy.deepcopy(user.to_dict()))
  n = c.num_students
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise TCNError(f'config.num_students must be a positive integer, got {n!r}')
  follow_teacher_input(c)   # Before the architectures are sized to it.
  scale_archs(c)
  needed = {'gan.disc': c.method == 'gan',
            'gan.g_steps_per_d_step': c.method == 'gan',
            'kd.arch': c.kd.enabled or c.kdgan.enabled}
  _check_feature(c)   # Before per-n values: n > D is the real problem.
  for path in PER_N:
    _choose(c, path, n, needed.get(path, True))
  _choose_defaults(c)
  _validate(c)
  return c


def _choose_defaults(c):
  """The values that unset fields take from others (the '' loss): in
  `resolve`, and in `upgrade` for an old config.json."""
  if not c.students.loss:
    c.students.loss = 'logit_matching' if c.students.logit_weight else 'mse'


def data_config(**fields) -> ml_collections.ConfigDict:
  """A `data` section as a resolved config holds it: `base_config().data`
  with `fields` set (e.g. name, dir, train_size):
  what `data.load` and `input_pipeline.load` take."""
  c = base_config()
  c.data.update(fields)
  return c.data


def upgrade(config):
  """A config written by an earlier version (an old workdir's
  `config.json`, as a dict or a ConfigDict) as today's fields: every
  back-compat rule is here.

  - Fields and sections added since (teacher.init_from, forward_impl,
    dtype, export, mesh, students.loss, students.features, the data
    section's image fields, ...) take today's default, which is the
    behaviour of the runs made before them; per-n tables are not added
    (the run's values were chosen).
  - `students.augment='flip'` (mirrored copies in memory) is now
    `data.augment='mirror'`.
  - A Keras `teacher.init_from` was mapped onto `teacher.body`
    (`keras_mode='body'`).
  - An image folder's `data.image_size` was 32 when unset (ImageNet's
    224, today's default for all).
  - Unset values chosen from others are chosen as `resolve` does.

  Returns the same type it was given; a config of today is returned equal.
  """
  given_dict = isinstance(config, dict)
  c = copy.deepcopy(config if given_dict else config.to_dict())
  students, data = c.get('students', {}), c.setdefault('data', {})
  if 'augment' in students:   # Before the one augmentation registry.
    old = students.pop('augment')
    if old:
      if data.get('augment'):
        raise TCNError(f'this config sets students.augment={old!r} and '
                       f"data.augment={data['augment']!r}; set only "
                       "config.data.augment (students.augment='flip' is "
                       "'mirror') and use a new workdir")
      data['augment'] = {'flip': 'mirror'}.get(old, old)
  teacher = c.get('teacher', {})
  if teacher and 'keras_mode' not in teacher:
    teacher['keras_mode'] = 'body'   # Keras files read onto teacher.body.
  if 'image_size' not in data and (data.get('name') == 'image_folder' or
                                   data.get('layout') == 'folder'):
    data['image_size'] = 32   # Before the field was in base_config.
  c = _with_defaults(c, base_config().to_dict())
  out = ml_collections.ConfigDict(c)
  _choose_defaults(out)
  return out.to_dict() if given_dict else out


def _with_defaults(cfg: dict, defaults: dict) -> dict:
  """cfg plus each field of `defaults` it lacks (not the `*_by_n` tables:
  per-n values stay those of the run's own config)."""
  out = dict(cfg)
  for k, v in defaults.items():
    if k.endswith('_by_n'):
      continue
    if k not in out:
      out[k] = copy.deepcopy(v)
    elif isinstance(v, dict) and isinstance(out[k], dict):
      out[k] = _with_defaults(out[k], v)
  return out


def to_json(config) -> dict:
  """The config as plain JSON data (what config.json holds)."""
  return json.loads(config.to_json_best_effort())


def student_specs(config) -> list[str]:
  """One architecture per student: `students.arch` is one string for all, or
  n strings separated by '|' (non-identical students, paper Table 4)."""
  n = config.num_students
  specs = [s.strip() for s in str(config.students.arch).split('|')]
  if len(specs) == 1:
    return specs * n
  if len(specs) != n:
    raise TCNError(f'config.students.arch gives {len(specs)} architectures '
                   f"('|'-separated) for num_students={n}")
  return specs


def check_number(field, value, kind, low, high=None, strict=False):
  """TCNError unless `value` is a finite `kind` (int or float) that is
  >= low (> low if strict) and < high."""
  ok = isinstance(value, (int, float) if kind is float else int) and (
      not isinstance(value, bool) and math.isfinite(value)
      and (value > low if strict else value >= low)
      and (high is None or value < high))
  if not ok:
    rule = f'{">" if strict else ">="} {low}' + (
        f' and < {high}' if high is not None else '')
    raise TCNError(f'config.{field} must be '
                   f'{"a number" if kind is float else "an integer"} {rule}, '
                   f'got {value!r}')


def check_widths(field, value):
  widths = str(value).split()
  if not widths or not all(w.isdigit() and int(w) > 0 for w in widths):
    raise TCNError(f'config.{field} must be layer widths like "64 128 256",'
                   f' got {" ".join(widths)!r}')


def parse_arch(field, spec):
  """models.parse, failing with a TCNError that names `config.<field>`."""
  try:
    return models.parse(spec)
  except (ValueError, AttributeError) as e:
    raise TCNError(f'config.{field}: {e}') from None


# An image folder's input when neither the config nor a Keras teacher file
# gives it (data.image_size / data.channels 0: 'auto').
FOLDER_IMAGE_SIZE = data_lib.FOLDER_AUTO_SIZE
FOLDER_CHANNELS = data_lib.FOLDER_AUTO_CHANNELS
# 'auto' architectures (configs/image_folder.py): conv + pooling stages
# (valid 3x3 convolutions, 2x2 max pooling), as many as keep the trunk's
# last feature map at least MIN_SIDE wide, then the dense tail.
AUTO_ARCHS = {
    'teacher.body': dict(widths=(32, 64, 128, 128, 256), min_side=2,
                         tail='F D256r'),
    'students.arch': dict(widths=(16, 32, 32, 64, 64), min_side=4,
                          tail='F D32r Do.3'),
}


def _is_folder(c) -> bool:
  return c.data.name == 'image_folder' or c.data.get('layout') == 'folder'


def follow_teacher_input(c):
  """An image folder's data.image_size and data.channels left 0 ('auto')
  follow a Keras teacher file's input (else FOLDER_IMAGE_SIZE /
  FOLDER_CHANNELS); set ones that differ from it fail with one line naming
  the field to change."""
  if not _is_folder(c) or 'image_size' not in c.data:
    return
  from tcn_jax import keras_convert  # pylint: disable=g-import-not-at-top
  path = c.teacher.get('init_from', '')
  want = None
  if (keras_convert.is_keras_file(path)
      and not c.teacher.get('features_from')):
    want = keras_convert.file_input_shape(
        path, f'config.teacher.init_from {path!r}')
  if want is not None and len(want) != 3:
    raise TCNError(f'config.teacher.init_from {path!r} takes inputs of shape '
                   f'{want}, not images (height, width, channels)')
  size, channels = c.data.image_size, c.data.get('channels', 3)
  if size == 0:
    sides = {d for d in (want or (None,) * 3)[:2] if d is not None}
    size = sides.pop() if len(sides) == 1 else FOLDER_IMAGE_SIZE
  if channels == 0:
    channels = (want[2] if want and want[2] is not None
                else FOLDER_CHANNELS)
  c.data.image_size = size
  if 'channels' in c.data:
    c.data.channels = channels
  if want is not None:
    problem = input_mismatch(c, want, (size, size, channels),
                                           path)
    if problem:
      raise TCNError(problem)


def auto_arch(field: str, image_size) -> str:
  """The 'auto' architecture of `field` for square images of `image_size`:
  the most conv + pooling stages (up to 5) whose trunk still ends at least
  AUTO_ARCHS[field]['min_side'] wide (e.g. students: 64 -> 3 stages, 6x6;
  28 -> 2 stages, 5x5)."""
  a = AUTO_ARCHS[field]
  if (not isinstance(image_size, int) or isinstance(image_size, bool)
      or image_size < 1):
    raise TCNError(f"config.{field}='auto' sizes itself to data.image_size, "
                   f'which is {image_size!r}; give an architecture string')
  side, stages = image_size, 0
  for _ in a['widths']:
    nxt = (side - 2) // 2   # A valid 3x3 convolution, then 2x2 pooling.
    if nxt < a['min_side']:
      break
    side, stages = nxt, stages + 1
  stages = max(stages, 1 if image_size >= 4 else 0)
  convs = ' '.join(f'C{w} MP' for w in a['widths'][:stages])
  return f'{convs} {a["tail"]}'.strip()


def scale_archs(c):
  """'auto' in teacher.body / students.arch: sized to data.image_size
  ('auto bn': with BatchNorm before each ReLU, the 'bn' preset)."""
  from tcn_jax import presets  # pylint: disable=g-import-not-at-top
  for field in AUTO_ARCHS:
    section, name = field.split('.')
    value = c[section].get(name)
    if value in ('auto', 'auto bn'):
      arch = auto_arch(field, c.data.get('image_size'))
      c[section][name] = (presets.with_batchnorm(arch) if value == 'auto bn'
                          else arch)


def _check_feature(c):
  """The teacher's body ends in a feature at least n wide."""
  body = parse_arch('teacher.body', c.teacher.body)
  sized = [l for l in body if l['kind'] in ('dense', 'gap')]
  if not sized:
    raise TCNError('config.teacher.body must end in a Dense feature layer '
                   '(or GAP, global average pooling)')
  if sized[-1]['kind'] == 'dense':   # A GAP width is checked on the data.
    chunking.chunk_sizes(sized[-1]['features'], c.num_students)


def _check_optimizer(field, name, learning_rate):
  optim.make_optimizer(name, learning_rate, f'config.{field}')


def check_combinations(c):
  """Fields that are each valid but wrong together (one line naming both).

  Cached teacher features are computed once from the centre crop of each
  training image; students that see per-epoch crops or flips
  (`data.augment`) would regress onto features of other pixels ('mirror'
  caches the mirrored images' features too).
  """
  per_epoch = augment.get(c.data.augment).per_epoch
  aug = c.data.augment if per_epoch else ''
  features = c.students.features
  if aug and features in ('', 'cached'):
    raise TCNError(f'config.students.features={features or "cached"!r} '
                   f'with config.data.augment={aug!r}: cached features '
                   'are of the un-augmented images, so students would learn '
                   "other targets than their inputs; use students.features="
                   "'online' (or 'auto'), or data.augment=''")
  if c.head.views:
    augment.check_view(c.head.views, 'config.head.views')
  views = c.students.views
  if views:
    augment.check_view(views)
    if features in ('', 'cached'):
      raise TCNError(f'config.students.views={views!r} with config.students.'
                     f'features={features or "cached"!r}: the teacher\'s '
                     'features must be of the same view, computed online; '
                     "use students.features='online' (or 'auto')")
    if aug:
      raise TCNError(f'config.students.views={views!r} with config.data.'
                     f'augment={aug!r}: choose one augmentation of the '
                     "students' images")
  if aug and c.kdgan.enabled:
    raise TCNError(f'config.kdgan.enabled needs cached teacher features, '
                   'which are of the un-augmented images; set '
                   f"config.data.augment='' (now {aug!r})")


def _validate(c):
  """Every check that needs no data, in the order a reader meets them."""
  n = c.num_students
  check_number('seed', c.seed, int, 0)
  check_number('data.split_seed', c.data.split_seed, int, 0)
  METHODS.check(c.method)
  DATASETS.check(c.data.name)
  if c.data.layout not in data_lib.LAYOUTS:
    raise TCNError("config.data.layout must be '' (the dataset's own source) "
                   f"or 'folder', got {c.data.layout!r}")
  if data_lib.is_folder(c.data):
    data_lib.check_folder(c.data)
  aug = augment.get(c.data.augment)
  if aug.pad or aug.mixup:
    raise TCNError(f'config.data.augment={c.data.augment!r} is drawn on '
                   "device for the students only: set config.students.views "
                   f'={c.data.augment!r} instead')
  if aug.per_epoch and not data_lib.is_folder(c.data):
    raise TCNError(f'config.data.augment={c.data.augment!r} changes images '
                   'per epoch, which needs a streamed image folder; in '
                   "memory use 'mirror', or config.students.views for the "
                   "students' views")
  STRATEGIES.check(c.students.strategy)
  distributed.validate(c.distributed, n)
  mesh_lib.validate(c.mesh)
  LAYERS_IMPLS.check(c.layers_impl)
  if c.forward_impl:
    LAYERS_IMPLS.check(c.forward_impl, 'forward_impl')
  DTYPES.check(c.dtype)
  INITS.check(c.students.init)
  for spec in student_specs(c):
    parse_arch('students.arch', spec)
  for section in ('teacher', 'students', 'head'):
    s = c[section]
    check_number(f'{section}.epochs', s.epochs, int, 0)
    check_number(f'{section}.batch_size', s.batch_size, int, 1)
    check_number(f'{section}.learning_rate', s.learning_rate, float, 0,
                 strict=True)
    if section != 'head':
      check_number(f'{section}.weight_decay', s.weight_decay, float, 0)
    _check_optimizer(f'{section}.optimizer', s.optimizer, s.learning_rate)
  if not isinstance(c.teacher.init_from, str):
    raise TCNError('config.teacher.init_from must be a path (a workdir, a '
                   'teacher checkpoint, a Keras or an ONNX file), got '
                   f'{c.teacher.init_from!r}')
  if c.teacher.get('keras_mode', '') not in KERAS_MODES:
    raise TCNError("config.teacher.keras_mode must be '' (auto), 'model' (a "
                   "Keras init_from taken whole) or 'body' (its weights "
                   f'mapped onto teacher.body), got {c.teacher.keras_mode!r}')
  check_number('students.logit_weight', c.students.logit_weight, float, 0)
  check_number('students.logit_temperature', c.students.logit_temperature,
               float, 0, strict=True)
  losses.STUDENT_LOSSES.check(c.students.loss)
  if optim.LR_SCHEDULES.check(c.students.lr_schedule) == 'step':
    raise TCNError("config.students.lr_schedule 'step' is the teacher's "
                   "(teacher.lr_step_epochs); choose 'constant' or 'cosine'")
  FEATURE_MODES.check(c.students.features)
  check_combinations(c)
  if c.students.features == 'online' and c.kdgan.enabled:
    raise TCNError("config.students.features='online' leaves no cached "
                   'features for KDGAN (config.kdgan.enabled); use cached')
  check_number('teacher.lr_step_epochs', c.teacher.lr_step_epochs, int, 0)
  check_number('teacher.lr_step_factor', c.teacher.lr_step_factor, float, 0,
               strict=True)
  check_number('teacher.head_dropout', c.teacher.head_dropout, float, 0, 1)
  check_number('head.dropout', c.head.dropout, float, 0, 1)
  check_number('data.val_fraction', c.data.val_fraction, float, 0, 1,
               strict=True)
  check_number('data.train_size', c.data.train_size, int, 0)
  check_number('data.test_size', c.data.test_size, int, 0)
  check_number('eval_batch_size', c.eval_batch_size, int, 1)
  formats.parse_formats(c.export.formats)
  check_number('export.batch_size', c.export.batch_size, int, 0)
  chunking.CHUNKINGS.check(c.chunking)
  chunking.PCA_ASSIGNMENTS.check(c.pca_assignment)
  if c.kd.enabled or c.kdgan.enabled:
    k = c.kd
    parse_arch('kd.arch', k.arch)
    check_number('kd.epochs', k.epochs, int, 0)
    check_number('kd.batch_size', k.batch_size, int, 1)
    check_number('kd.learning_rate', k.learning_rate, float, 0, strict=True)
    check_number('kd.temperature', k.temperature, float, 0, strict=True)
    check_number('kd.alpha', k.alpha, float, 0)
    if k.alpha > 1:
      raise TCNError(f'config.kd.alpha must be in [0, 1], got {k.alpha!r}')
    _check_optimizer('kd.optimizer', k.optimizer, k.learning_rate)
    check_number('kd.weight_decay', k.weight_decay, float, 0)
  if c.kdgan.enabled:
    g = c.kdgan
    check_number('kdgan.epochs', g.epochs, int, 0)
    check_number('kdgan.adv_weight', g.adv_weight, float, 0)
    check_number('kdgan.gumbel_temperature', g.gumbel_temperature, float, 0,
                 strict=True)
    check_number('kdgan.d_learning_rate', g.d_learning_rate, float, 0,
                  strict=True)
    _check_optimizer('kdgan.d_optimizer', g.d_optimizer, g.d_learning_rate)
    check_widths('kdgan.disc', g.disc)
  if c.method == 'gan':
    g = c.gan
    GAN_MSE_TARGETS.check(g.mse_target)
    check_widths('gan.disc', g.disc)
    check_number('gan.g_steps_per_d_step', g.g_steps_per_d_step, int, 1)
    for field in ('adv_weight', 'mse_weight'):
      check_number(f'gan.{field}', g[field], float, 0)
    check_number('gan.d_learning_rate', g.d_learning_rate, float, 0,
                 strict=True)
    _check_optimizer('gan.d_optimizer', g.d_optimizer, g.d_learning_rate)
