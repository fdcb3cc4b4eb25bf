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
STRATEGIES.register('auto', 'vmap on one device, sharded over several')
STRATEGIES.register('vmap', 'the members of a group in one vmapped program')
STRATEGIES.register('unrolled', 'the members one after another in a program')
STRATEGIES.register('sharded', 'the members over the devices')
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
      workers=0, checkpoint_every_steps=0))
  # init_from: a workdir of this library (its teacher/), a teacher
  # checkpoint directory or a Keras model file (.keras, .h5): that trained
  # teacher is used, none is trained.
  c.teacher = ml_collections.ConfigDict(dict(
      body='C32 C64 MP Do.25 F D256r D256r', head_dropout=0.5, head_bn=False,
      optimizer='adam', learning_rate=1e-3, weight_decay=0.0, batch_size=256,
      epochs=20, lr_step_epochs=0, lr_step_factor=0.5, init_from=''))
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
      # Not in the paper (off): + logit_weight * T^2 * KL between the
      # teacher's logits and its frozen head on the feature with this
      # student's chunk swapped in (losses.logit_matching).
      logit_weight=0.0, logit_temperature=2.0))
  c.head = ml_collections.ConfigDict(dict(
      dropout=-1.0, dropout_by_n={'1': 0.5, '2': 0.5, '4': 0.5, '8': 0.3},
      optimizer='', optimizer_by_n={'1': 'adam', '2': 'adam', '4': 'adam',
                                    '8': 'nadam'},
      learning_rate=1e-3, batch_size=128, keep_teacher_bn=False,
      epochs=-1, epochs_by_n={'1': 5, '2': 30, '4': 20, '8': 10}))
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
  # Processes of a multi-host run (docs/distributed.md).
  c.distributed = ml_collections.ConfigDict(dict(
      num_processes=1, process_id=0, coordinator=''))
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
    section[field] = table[str(n)]
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
  if aug.per_epoch and not data_lib.is_folder(c.data):
    raise TCNError(f'config.data.augment={c.data.augment!r} changes images '
                   'per epoch, which needs a streamed image folder; in '
                   "memory use 'mirror'")
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
                   'teacher checkpoint or a Keras file), got '
                   f'{c.teacher.init_from!r}')
  check_number('students.logit_weight', c.students.logit_weight, float, 0)
  check_number('students.logit_temperature', c.students.logit_temperature,
               float, 0, strict=True)
  losses.STUDENT_LOSSES.check(c.students.loss)
  if optim.LR_SCHEDULES.check(c.students.lr_schedule) == 'step':
    raise TCNError("config.students.lr_schedule 'step' is the teacher's "
                   "(teacher.lr_step_epochs); choose 'constant' or 'cosine'")
  FEATURE_MODES.check(c.students.features)
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
