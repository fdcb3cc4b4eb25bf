"""The pipeline's stages as plain functions over explicit state.

teacher -> features (cached) -> chunks -> students (one program per group)
-> assemble -> evaluate -> fine-tune head -> evaluate -> save TCN.
Every stage checkpoints per epoch under the workdir and is resumed or skipped
when the same command runs again.
"""
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import time
import zipfile

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tcn_jax import assemble
from tcn_jax import checkpoint
from tcn_jax import data as data_lib
from tcn_jax import distributed
from tcn_jax import engine
from tcn_jax import features as features_lib
from tcn_jax import gan as gan_lib
from tcn_jax import kdgan as kdgan_lib
from tcn_jax import layers
from tcn_jax import metrics
from tcn_jax import models
from tcn_jax.errors import TCNError

STAGES = ('teacher', 'students', 'head', 'kd', 'kdgan')
METHODS = ('ff', 'gan')
CHUNKINGS = ('contiguous', 'pca')
LR_SCHEDULES = ('constant', 'cosine')
AUGMENTS = ('', 'flip')


def make_optimizer(name: str, learning_rate: float, field: str):
  """Optax optimizers with Keras' defaults (Adam/Nadam eps 1e-7)."""
  if name == 'adam':
    return optax.adam(learning_rate, eps=1e-7)
  if name == 'nadam':
    return optax.nadam(learning_rate, eps=1e-7)
  if name == 'sgd':
    return optax.sgd(learning_rate, momentum=0.9, nesterov=True)
  raise TCNError(f'unknown optimizer {name!r} ({field}); '
                 "choose 'adam', 'nadam' or 'sgd'")


def per_n(config, path: str, n: int):
  """`config.<path>`, or for an unset one (''/-1) the paper's value for n
  from `config.<path>_by_n`; e.g. per_n(config, 'head.epochs', 4)."""
  *parents, field = path.split('.')
  section = config
  for p in parents:
    section = section[p]
  value = section[field]
  if value not in ('', -1, -1.0, None):
    return value
  table = section.get(field + '_by_n') or {}
  if not table:
    return value   # No paper values: `validate` judges the value itself.
  if str(n) not in table:
    raise TCNError(f'no {field} for num_students={n}: set --config.{path} '
                   f'(paper values exist for n in {sorted(table, key=int)})')
  return table[str(n)]


def stage_seed(seed: int, stage: str) -> int:
  return int(np.random.SeedSequence([seed, STAGES.index(stage)])
             .generate_state(1)[0])


def ce_loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mse_loss(pred, target):
  return jnp.mean((pred - target) ** 2)


def logit_matching_loss(head, head_variables, width, weight, temperature,
                        basis=None):
  """A classification-aware student loss that keeps students independent:
  MSE to the student's chunk + weight * T^2 * KL(softmax(teacher logits / T)
  || softmax(head(teacher feature with this chunk replaced by the student's
  output) / T)), the frozen teacher head in inference mode.

  Targets are [the full teacher feature (D) | the chunk's offset]; with PCA
  chunks the feature is in coefficient space and `basis` maps it back.
  """
  def logits(feature):
    if basis is not None:
      feature = feature @ basis['matrix'] + basis['mean']
    return head.apply(head_variables, feature) / temperature

  def loss(pred, target):
    feature, offset = target[:, :-1], target[0, -1].astype(jnp.int32)
    chunk = logit_matching_chunk(width)(target)
    mixed = jax.lax.dynamic_update_slice_in_dim(feature, pred, offset, axis=1)
    t = jax.nn.log_softmax(logits(feature))
    s = jax.nn.log_softmax(logits(mixed))
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1).mean()
    return mse_loss(pred, chunk) + weight * temperature ** 2 * kl
  return loss


def logit_matching_chunk(width):
  """The student's chunk in a `logit_matching_loss` target row."""
  def chunk_of(target):
    offset = target[0, -1].astype(jnp.int32)
    return jax.lax.dynamic_slice_in_dim(target[:, :-1], offset, width, axis=1)
  return chunk_of


def logit_matching_targets(features, num_students, member_ids):
  """Per member: [the full teacher feature | its chunk's offset] rows, the
  targets of `logit_matching_loss`."""
  bounds = features_lib.chunk_bounds(features.shape[1], num_students)
  return np.stack([np.concatenate(
      [features, np.full((len(features), 1), bounds[i][0], features.dtype)],
      1) for i in member_ids])


def fit(stage_dir, *, name, model, loss, tx, variables, x, targets, ids,
        epochs, batch_size, seed, strategy, val_x, val_targets, val_metric,
        writer, weight_decay=0.0):
  """Gradient descent on loss(model(x), target) (+ weight_decay * the L2 of
  the kernels) for a stacked group of Flax `variables`; BatchNorm statistics
  and other mutable collections update in train mode. See `fit_group`.
  Returns (variables, history, training seconds)."""
  params = variables['params']
  model_state = {k: v for k, v in variables.items() if k != 'params'}

  def apply_train(p, ms, xb, key):
    return model.apply({'params': p, **ms}, xb, train=True,
                       rngs={'dropout': key}, mutable=list(ms))

  def objective(p, pred, tb):
    out = loss(pred, tb)
    return out + weight_decay * models.l2_penalty(p) if weight_decay else out

  if model_state:
    def loss_fn(p, ms, xb, tb, key):
      pred, ms = apply_train(p, ms, xb, key)
      return objective(p, pred, tb), ms
  else:
    def loss_fn(p, xb, tb, key):
      return objective(p, apply_train(p, {}, xb, key)[0], tb)

  state = {'params': params, 'opt_state': jax.vmap(tx.init)(params)}
  if model_state:
    state['model_state'] = model_state
  state, history, seconds = fit_group(
      stage_dir, name=name, member_step=engine.gradient_step(loss_fn, tx),
      state=state, predict=lambda s, xb: model.apply(
          {'params': s['params'], **s.get('model_state', {})}, xb), x=x,
      targets=targets, ids=ids, epochs=epochs, batch_size=batch_size,
      seed=seed, strategy=strategy, val_x=val_x, val_targets=val_targets,
      val_metric=val_metric, writer=writer)
  variables = {'params': state['params'], **state.get('model_state', {})}
  return variables, history, seconds


def fit_group(stage_dir, *, name, member_step, state, predict, x, targets, ids,
              epochs, batch_size, seed, strategy, val_x, val_targets,
              val_metric, writer):
  """Trains a stacked group for `epochs` with the engine, resuming from
  `stage_dir` (per-epoch checkpoints of the whole state).

  member_step(state, x, target, key) -> (state, metrics dict with 'loss');
  predict(member_state, x) is scored by val_metric(pred, target) per member
  after each epoch. Without stage_dir nothing is saved; without writer
  nothing goes to TensorBoard. Returns (state, history, training seconds).
  """
  n = len(ids)
  with (checkpoint.StageCheckpoint(stage_dir) if stage_dir
        else contextlib.nullcontext()) as ckpt:
    start = ckpt.latest_epoch() if ckpt else 0
    history, seconds = [], 0.0
    if start:
      state, record = ckpt.restore(state)
      history, seconds = record['history'], record['seconds']
      logging.info('[%s] resuming after epoch %d/%d', name, start, epochs)
    if start >= epochs:
      return state, history, seconds

    epoch_fn = engine.make_group_epoch(member_step, n, strategy)
    apply = engine.make_apply_fn(predict, n, strategy)
    keys = engine.member_keys(seed, ids)
    x_dev, t_dev = jnp.asarray(x), jnp.asarray(targets)
    progress = metrics.Progress(name, epochs, start)
    for epoch in range(start, epochs):
      with checkpoint.signals_deferred():   # A stop waits for epoch + save.
        t0 = time.time()
        order = engine.batch_order(seed, epoch, len(x), batch_size)
        state, step_metrics = epoch_fn(state, x_dev, t_dev, order, keys, epoch)
        step_metrics = {k: np.asarray(v) for k, v in step_metrics.items()}
        losses = step_metrics['loss']
        bad = np.argwhere(~np.all([np.isfinite(v) for v in
                                   step_metrics.values()], axis=0))
        if len(bad):
          step, member = bad[0]
          raise TCNError(
              f'non-finite loss in stage {name}, member {ids[member]}, epoch '
              f'{epoch + 1}, step {step}; last good checkpoint: '
              + (f'epoch {epoch} in {stage_dir}' if epoch and ckpt else 'none'))
        preds = engine.batched(lambda xb: apply(state, xb), val_x, axis=1)
        val = [val_metric(preds[m], val_targets[m]) for m in range(n)]
        seconds += time.time() - t0
        record = {'epoch': epoch + 1, 'train_loss': losses.mean(0).tolist(),
                  'val': val, 'seconds': seconds}
        record.update({f'train_{k}': v.mean(0).tolist()
                       for k, v in step_metrics.items() if k != 'loss'})
        history.append(record)
        if ckpt:
          ckpt.save(epoch + 1, state, {'history': history, 'seconds': seconds})
      scalars = {f'{name}/{k}/{i}': v for k, vs in record.items()
                 if k.startswith('train_') or k == 'val'
                 for i, v in zip(ids, vs)}
      if writer:
        writer.scalars(epoch + 1, scalars)
      progress.epoch(epoch + 1, {'loss': float(losses[-len(losses) // 10 - 1:]
                                               .mean()),
                                 'val': float(np.mean(val))})
    return state, history, seconds


def check_workdir(config, workdir):
  """Creates the workdir, takes its lock, and refuses a changed config."""
  try:
    os.makedirs(workdir, exist_ok=True)
    lock = open(os.path.join(workdir, 'lock'), 'w')
  except OSError as e:
    raise TCNError(f'workdir {workdir} is not writable: {e.strerror}') from None
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    raise TCNError(f'workdir {workdir} is in use by another run') from None
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = _diff(old, new)
    if diff and not config.allow_config_change:
      raise TCNError(f'workdir {workdir} holds a run with another config '
                     f'({"; ".join(diff)}); use a new workdir or '
                     '--config.allow_config_change=True')
  checkpoint.write_json(path, new)
  return lock


def _diff(old, new, prefix=''):
  """The changed fields, as 'path: old -> new'. A field the old run's
  config.json lacks and the new config leaves off ('', 0, False) is an
  option added since that run, with the old behaviour: not a change."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, '<unset>'), new.get(k, '<unset>')
    if k in ('allow_config_change', 'distributed'):
      continue   # distributed: ports change per launch; students do not.
    if k not in old and not isinstance(b, dict) and not b:
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f'{prefix}{k}.')
    elif a != b:
      out.append(f'{prefix}{k}: {a!r} -> {b!r}')
  return out


def _check_number(field, value, kind, low, high=None, strict=False):
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


def _check_widths(field, value):
  widths = str(value).split()
  if not widths or not all(w.isdigit() and int(w) > 0 for w in widths):
    raise TCNError(f'config.{field} must be layer widths like "64 128 256",'
                   f' got {" ".join(widths)!r}')


def _parse(field, spec):
  """models.parse, failing with a TCNError that names `config.<field>`."""
  try:
    return models.parse(spec)
  except (ValueError, AttributeError) as e:
    raise TCNError(f'config.{field}: {e}') from None


def validate(config):
  """Fails fast, naming the field, on values that cannot work."""
  n = config.num_students
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise TCNError(f'config.num_students must be a positive integer, got {n!r}')
  if config.method not in METHODS:
    raise TCNError(f'unknown method {config.method!r} (config.method); '
                   f'choose one of {METHODS}')
  if config.data.name not in data_lib.DATASETS:
    raise TCNError(f'unknown dataset {config.data.name!r} (config.data.name); '
                   f'choose one of {data_lib.DATASETS}')
  engine.resolve_strategy(config.students.strategy)
  distributed.validate(config.get('distributed'), n)
  if config.layers_impl not in layers.IMPLS:
    raise TCNError(f'unknown layers_impl {config.layers_impl!r}; '
                   f'choose one of {layers.IMPLS}')
  if config.students.init not in models.INITS:
    raise TCNError(f'unknown initializer {config.students.init!r} (config.'
                   f'students.init); choose one of {tuple(models.INITS)}')
  body = _parse('teacher.body', config.teacher.body)
  sized = [l for l in body if l['kind'] in ('dense', 'gap')]
  if not sized:
    raise TCNError('config.teacher.body must end in a Dense feature layer '
                   '(or GAP, global average pooling)')
  if sized[-1]['kind'] == 'dense':   # A GAP width is checked on the data.
    features_lib.chunk_sizes(sized[-1]['features'], n)
  specs = student_specs(config)
  for spec in specs:
    _parse('students.arch', spec)
  for section in ('teacher', 'students', 'head'):
    c = config[section]
    _check_number(f'{section}.epochs', per_n(config, f'{section}.epochs', n),
                  int, 0)
    _check_number(f'{section}.batch_size', c.batch_size, int, 1)
    _check_number(f'{section}.learning_rate', c.learning_rate, float, 0,
                  strict=True)
    if section != 'head':
      _check_number(f'{section}.weight_decay', c.weight_decay, float, 0)
    make_optimizer(per_n(config, f'{section}.optimizer', n), c.learning_rate,
                   f'config.{section}.optimizer')
  _check_number('students.logit_weight', config.students.logit_weight, float,
                0)
  _check_number('students.logit_temperature',
                config.students.logit_temperature, float, 0, strict=True)
  if config.students.lr_schedule not in LR_SCHEDULES:
    raise TCNError(f'unknown config.students.lr_schedule '
                   f'{config.students.lr_schedule!r}; choose one of '
                   f'{", ".join(LR_SCHEDULES)}')
  if config.students.augment not in AUGMENTS:
    raise TCNError(f'unknown config.students.augment '
                   f'{config.students.augment!r}; choose one of '
                   f'{AUGMENTS}')
  _check_number('teacher.lr_step_epochs', config.teacher.lr_step_epochs, int,
                0)
  _check_number('teacher.lr_step_factor', config.teacher.lr_step_factor,
                float, 0, strict=True)
  _check_number('teacher.head_dropout', config.teacher.head_dropout, float,
                0, 1)
  _check_number('head.dropout', per_n(config, 'head.dropout', n), float, 0, 1)
  _check_number('data.val_fraction', config.data.val_fraction, float, 0, 1,
                strict=True)
  _check_number('data.train_size', config.data.train_size, int, 0)
  _check_number('data.test_size', config.data.test_size, int, 0)
  _check_number('eval_batch_size', config.eval_batch_size, int, 1)
  if config.chunking not in CHUNKINGS:
    raise TCNError(f'unknown chunking {config.chunking!r} (config.chunking);'
                   f' choose one of {CHUNKINGS}')
  if config.pca_assignment not in features_lib.PCA_ASSIGNMENTS:
    raise TCNError(f'unknown pca_assignment {config.pca_assignment!r}; '
                   f'choose one of {features_lib.PCA_ASSIGNMENTS}')
  if config.kd.enabled:
    k = config.kd
    _parse('kd.arch', per_n(config, 'kd.arch', n))
    _check_number('kd.epochs', k.epochs, int, 0)
    _check_number('kd.batch_size', k.batch_size, int, 1)
    _check_number('kd.learning_rate', k.learning_rate, float, 0, strict=True)
    _check_number('kd.temperature', k.temperature, float, 0, strict=True)
    _check_number('kd.alpha', k.alpha, float, 0)
    if k.alpha > 1:
      raise TCNError(f'config.kd.alpha must be in [0, 1], got {k.alpha!r}')
    make_optimizer(k.optimizer, k.learning_rate, 'config.kd.optimizer')
    _check_number('kd.weight_decay', k.weight_decay, float, 0)
  if config.kdgan.enabled:
    g = config.kdgan
    _parse('kd.arch', per_n(config, 'kd.arch', n))
    _check_number('kdgan.epochs', g.epochs, int, 0)
    _check_number('kdgan.adv_weight', g.adv_weight, float, 0)
    _check_number('kdgan.gumbel_temperature', g.gumbel_temperature, float, 0,
                  strict=True)
    _check_number('kdgan.d_learning_rate', g.d_learning_rate, float, 0,
                  strict=True)
    make_optimizer(g.d_optimizer, g.d_learning_rate,
                   'config.kdgan.d_optimizer')
    _check_widths('kdgan.disc', g.disc)
  if config.method == 'gan':
    g = config.gan
    if g.mse_target not in gan_lib.MSE_TARGETS:
      raise TCNError(f'unknown gan.mse_target {g.mse_target!r}; choose one '
                     f'of {gan_lib.MSE_TARGETS}')
    _check_widths('gan.disc', per_n(config, 'gan.disc', n))
    _check_number('gan.g_steps_per_d_step',
                  per_n(config, 'gan.g_steps_per_d_step', n), int, 1)
    for field in ('adv_weight', 'mse_weight'):
      _check_number(f'gan.{field}', g[field], float, 0)
    _check_number('gan.d_learning_rate', g.d_learning_rate, float, 0,
                  strict=True)
    make_optimizer(g.d_optimizer, g.d_learning_rate, 'config.gan.d_optimizer')


def check_fits(field, spec, input_shape, impl, dtype=np.float32):
  """Fails, naming `field`, unless `spec` maps one input of `input_shape` to
  a flat feature vector; returns its width."""
  try:
    out = models.output_shape(spec, input_shape, impl, dtype)
  except ValueError as e:
    raise TCNError(f'config.{field} {spec!r} does not fit inputs of shape '
                   f'{tuple(input_shape)}: {e}') from None
  if len(out) != 1:
    raise TCNError(f'config.{field} {spec!r} gives outputs of shape {out} '
                   f'for inputs of shape {tuple(input_shape)}; add F '
                   '(Flatten) before its Dense layers')
  return out[0]


def _stage_dir(workdir, *parts):
  return os.path.join(workdir, *parts) if workdir else None


def train_teacher(teacher, ds, *, epochs, batch_size=256, optimizer='adam',
                  learning_rate=1e-3, weight_decay=0.0, lr_step_epochs=0,
                  lr_step_factor=0.5, seed=0, workdir=None, writer=None):
  """Stage 1: trains the teacher with cross-entropy (resumable in workdir).

  With lr_step_epochs > 0 the learning rate is multiplied by lr_step_factor
  every lr_step_epochs epochs (the CIFAR-10 teacher's schedule).

  Returns (variables, info): Flax variables {'params', and 'batch_stats'
  for teachers with BatchNorm}; info = {'history', 'seconds'}.
  """
  seed = stage_seed(seed, 'teacher')
  lr = learning_rate
  if lr_step_epochs:
    lr = optax.exponential_decay(
        learning_rate, lr_step_epochs * (len(ds.train) // batch_size),
        lr_step_factor, staircase=True)
  variables, history, seconds = fit(
      _stage_dir(workdir, 'teacher'), name='teacher', model=teacher,
      loss=ce_loss, tx=make_optimizer(optimizer, lr, 'config.teacher.optimizer'),
      variables=engine.init_group(lambda k: teacher.init(k, ds.train.x[:1]),
                                  seed, [0]),
      x=ds.train.x, targets=ds.train.y[None], ids=[0], epochs=epochs,
      batch_size=batch_size, seed=seed, strategy='auto', val_x=ds.val.x,
      val_targets=ds.val.y[None], val_metric=metrics.accuracy, writer=writer,
      weight_decay=weight_decay)
  return (engine.unstack(variables, 1)[0],
          {'history': history, 'seconds': seconds})


def cached_features(teacher, variables, ds, workdir, batch_size,
                    augment=''):
  """Teacher features of train/val (and with augment='flip' of the mirrored
  train images, 'train_flip'), computed once and kept in the workdir.

  The file records a digest of the teacher's parameters and the images, so
  features of another teacher or data are recomputed, as is a damaged file.
  """
  path = os.path.join(workdir, 'features.npz')
  images = {'train': ds.train.x, 'val': ds.val.x}
  if augment == 'flip':
    images['train_flip'] = data_lib.hflip(ds.train.x)
  digest = checkpoint.digest(variables, *images.values())
  try:
    with np.load(path) as f:
      if str(f['digest']) == digest:
        logging.info('features: reusing %s', path)
        return {s: f[s] for s in images}
  except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
    pass   # Missing, from another version, or damaged: compute again.
  feats = {s: features_lib.teacher_features(teacher, variables, x, batch_size)
           for s, x in images.items()}
  checkpoint.atomic_write(path, lambda f: np.savez(f, digest=digest, **feats))
  return feats


def train_students(specs, x, features, num_students, *, epochs,
                   batch_size=128, optimizer='adam', learning_rate=1e-3,
                   out_relu=False, init='normal', weight_decay=0.0, seed=0,
                   strategy='auto', impl='auto', val=None, gan=None,
                   workdir=None, writer=None, members=None, dir_suffix='',
                   logit_match=None, lr_schedule='constant'):
  """Stage 2: n students regress the n contiguous chunks of `features`.

  specs: one architecture string for all students, or one per student.
  Identical students (same architecture and chunk width) form a group that
  trains in one compiled program. val: optional (x_val, features_val).
  gan: None for FF students (MSE), or a dict of GAN settings (see
  `gan_settings`) for adversarial students, one discriminator each.
  Returns (groups with trained variables, info) with info = {'val_mse': per
  student list over epochs (empty without val), 'history': per group,
  'seconds'}.
  logit_match: optional dict(head, head_variables, weight, temperature,
  basis): students' regression loss is `logit_matching_loss` instead of MSE
  (for GAN students, the term beside the adversarial one).
  lr_schedule: 'constant' (the paper) or 'cosine' (decays learning_rate to
  0 over the epochs; not in the paper).
  members: train only these member ids (tcn_jax.distributed: a process's
  share); the groups returned hold only them, and other students' val_mse
  is []. dir_suffix is appended to the group checkpoint directories.
  """
  if isinstance(specs, str):
    specs = [specs] * num_students
  if len(specs) != num_students:
    raise TCNError(f'{len(specs)} student architectures given for '
                   f'num_students={num_students}')
  sizes = features_lib.chunk_sizes(features.shape[1], num_students)
  groups = assemble.group_students(specs, sizes, out_relu, init)
  chunks = features_lib.chunk(features, num_students)
  val_x, val_chunks = x[:1], [c[:1] for c in chunks]
  if val is not None:
    val_x, val_chunks = val[0], features_lib.chunk(val[1], num_students)
  seed = stage_seed(seed, 'students')
  lr = learning_rate
  if lr_schedule == 'cosine':
    lr = optax.cosine_decay_schedule(
        learning_rate, max(1, epochs * (len(x) // batch_size)))
  tx = make_optimizer(optimizer, lr, 'config.students.optimizer')
  val_mse, histories, seconds = {}, [], 0.0
  for gi, group in enumerate(groups):
    # -- distributed: only this process's members (gi stays the full index).
    if members is not None:
      group.member_ids = [m for m in group.member_ids if m in members]
      if not group.member_ids:
        continue
    # -- end distributed
    model = group.model(impl)
    common = dict(
        name=f'students[{gi}]', x=x, ids=group.member_ids,
        targets=np.stack([chunks[i] for i in group.member_ids]),
        epochs=epochs, batch_size=batch_size, seed=seed, strategy=strategy,
        val_x=val_x, val_metric=metrics.mse, writer=writer,
        val_targets=np.stack([val_chunks[i] for i in group.member_ids]))
    stage_dir = _stage_dir(workdir, 'students', f'group{gi}{dir_suffix}')
    loss, chunk_of = mse_loss, None
    if logit_match:
      loss = logit_matching_loss(width=group.out_dim, **logit_match)
      chunk_of = logit_matching_chunk(group.out_dim)
      common['targets'] = logit_matching_targets(features, num_students,
                                                 group.member_ids)
    if gan is None:
      init_fn = lambda k, model=model: model.init(k, x[:1])
      group.variables, hist, secs = fit(
          stage_dir, model=model, loss=loss, tx=tx,
          variables=engine.init_group(init_fn, seed, group.member_ids),
          weight_decay=weight_decay, **common)
    else:
      disc = gan_lib.Discriminator(gan['disc_widths'], group.out_dim,
                                   gan['disc_first_bias'], gan['recon_relu'])
      d_tx = make_optimizer(gan['d_optimizer'], gan['d_learning_rate'],
                            'config.gan.d_optimizer')
      init_fn = lambda k, model=model, disc=disc, d_tx=d_tx: (
          gan_lib.init_state(model, disc, tx, d_tx, k, x[:1]))
      state, hist, secs = fit_group(
          stage_dir, state=engine.init_group(init_fn, seed, group.member_ids),
          member_step=gan_lib.make_member_step(
              model, disc, tx, d_tx, mse_target=gan['mse_target'],
              adv_weight=gan['adv_weight'], mse_weight=gan['mse_weight'],
              g_steps_per_d_step=gan['g_steps_per_d_step'],
              regression=loss if logit_match else None, chunk_of=chunk_of),
          predict=lambda s, xb, model=model: model.apply(
              {'params': s['g'], **s['g_state']}, xb), **common)
      group.variables = {'params': state['g'], **state['g_state']}
    for i, mid in enumerate(group.member_ids):
      val_mse[mid] = [h['val'][i] for h in hist] if val is not None else []
    histories.append(hist)
    seconds += secs
  groups = [g for g in groups if g.member_ids]   # members= may drop some.
  return groups, {'val_mse': [val_mse.get(i, []) for i in range(num_students)],
                  'history': histories, 'seconds': seconds}


def student_specs(config) -> list[str]:
  """One architecture per student: `students.arch` is one string for all, or
  n strings separated by '|' (non-identical students, paper Table 4)."""
  n = config.num_students
  specs = [s.strip() for s in per_n(config, 'students.arch', n).split('|')]
  if len(specs) == 1:
    return specs * n
  if len(specs) != n:
    raise TCNError(f'config.students.arch gives {len(specs)} architectures '
                   f"('|'-separated) for num_students={n}")
  return specs


def gan_settings(config, n):
  """The GAN students' settings from `config.gan` (None for FF)."""
  if config.method != 'gan':
    return None
  g = config.gan
  return {'disc_widths': tuple(int(w) for w in
                               str(per_n(config, 'gan.disc', n)).split()),
          'disc_first_bias': g.disc_first_bias, 'recon_relu': g.recon_relu,
          'mse_target': g.mse_target,
          'adv_weight': g.adv_weight, 'mse_weight': g.mse_weight,
          'g_steps_per_d_step': per_n(config, 'gan.g_steps_per_d_step', n),
          'd_optimizer': g.d_optimizer, 'd_learning_rate': g.d_learning_rate}


def finetune_head(tcn, ds, *, epochs, batch_size=128, optimizer='adam',
                  learning_rate=1e-3, seed=0, strategy='auto',
                  eval_batch_size=1000, workdir=None, writer=None):
  """Stage 3: trains `tcn`'s head (initialised from the teacher's) with CE on
  the frozen students' outputs (inference mode, computed once).

  Returns (tcn with the new head, info) with info = {'test_acc_before',
  'test_acc_after', 'history', 'seconds'} (paper Table 2).
  """
  outputs = assemble.student_outputs_fn(tcn, strategy)
  students = [g.variables for g in tcn.groups]
  stage_dir = _stage_dir(workdir, 'head')
  # A finished head (resume) needs only the test outputs.
  splits = ('train', 'val', 'test')
  if checkpoint.finished_epochs(stage_dir) >= epochs:
    splits = ('test',)
  feats = {s: engine.batched(lambda xb: outputs(students, xb),
                             getattr(ds, s).x, eval_batch_size)
           for s in splits}
  head = assemble.tcn_head(tcn)
  logits = lambda v, f: engine.batched(jax.jit(lambda fb: head.apply(v, fb)),
                                       f, eval_batch_size)
  test_acc = lambda v: metrics.accuracy(logits(v, feats['test']), ds.test.y)
  before = test_acc(tcn.head_variables)
  seed = stage_seed(seed, 'head')
  variables, history, seconds = fit(
      stage_dir, name='head', model=head, loss=ce_loss,
      tx=make_optimizer(optimizer, learning_rate, 'config.head.optimizer'),
      variables=engine.stack([tcn.head_variables]), x=feats.get('train'),
      targets=ds.train.y[None], ids=[0], epochs=epochs,
      batch_size=batch_size, seed=seed, strategy='auto',
      val_x=feats.get('val'), val_targets=ds.val.y[None],
      val_metric=metrics.accuracy, writer=writer)
  tcn = dataclasses.replace(tcn,
                            head_variables=engine.unstack(variables, 1)[0])
  after = test_acc(tcn.head_variables)
  return tcn, {'test_acc_before': before, 'test_acc_after': after,
               'history': history, 'seconds': seconds}


def kd_loss(temperature: float, alpha: float):
  """Hinton et al. (2015): alpha * T^2 * CE(softmax(t/T), softmax(s/T)) +
  (1 - alpha) * CE(s, label). Targets are [teacher logits | label]."""
  def loss(logits, target):
    t_logits, labels = target[:, :-1], target[:, -1].astype(jnp.int32)
    soft = optax.softmax_cross_entropy(
        logits / temperature, jax.nn.softmax(t_logits / temperature)).mean()
    return (alpha * temperature ** 2 * soft
            + (1 - alpha) * ce_loss(logits, labels))
  return loss


def train_kd_student(spec, teacher_logits, ds, *, epochs, temperature=4.0,
                     alpha=0.9, batch_size=128, optimizer='adam',
                     learning_rate=1e-3, init='glorot_uniform',
                     weight_decay=0.0, seed=0, impl='auto', workdir=None,
                     writer=None):
  """Baseline: one classifier student (`spec` + Dense(classes)) trained on
  the teacher's softened logits plus labels. `teacher_logits` may be None
  when the stage is finished (resume): it is then only restored.

  Returns (model, variables, info)."""
  model = models.Net(f'{spec} D{ds.num_classes}', init, impl)
  seed = stage_seed(seed, 'kd')
  targets = None if teacher_logits is None else np.concatenate(
      [teacher_logits, ds.train.y[:, None]], 1)[None].astype(np.float32)
  variables, history, seconds = fit(
      _stage_dir(workdir, 'kd'), name='kd', model=model,
      loss=kd_loss(temperature, alpha),
      tx=make_optimizer(optimizer, learning_rate, 'config.kd.optimizer'),
      variables=engine.init_group(lambda k: model.init(k, ds.train.x[:1]),
                                  seed, [0]),
      x=ds.train.x, targets=targets, ids=[0],
      epochs=epochs, batch_size=batch_size, seed=seed, strategy='auto',
      val_x=ds.val.x, val_targets=ds.val.y[None],
      val_metric=metrics.accuracy, writer=writer, weight_decay=weight_decay)
  return model, engine.unstack(variables, 1)[0], {'history': history,
                                                  'seconds': seconds}


def train_kdgan_student(spec, teacher_logits, teacher_feats, ds, *, epochs,
                        temperature=4.0, alpha=0.9, adv_weight=1.0,
                        gumbel_temperature=1.0, disc_widths=(256, 128),
                        batch_size=128, optimizer='adam', learning_rate=1e-3,
                        d_optimizer='adam', d_learning_rate=2e-4,
                        init='glorot_uniform', seed=0, impl='auto',
                        workdir=None, writer=None):
  """Baseline: the KD student plus KDGAN's adversarial label game (see
  `tcn_jax.kdgan` for what is built). `teacher_logits` may be None when the
  stage is finished, as in `train_kd_student`. Returns (model, variables,
  info)."""
  model = models.Net(f'{spec} D{ds.num_classes}', init, impl)
  disc = kdgan_lib.LabelDiscriminator(tuple(disc_widths))
  seed = stage_seed(seed, 'kdgan')
  c_tx = make_optimizer(optimizer, learning_rate, 'config.kd.optimizer')
  d_tx = make_optimizer(d_optimizer, d_learning_rate,
                        'config.kdgan.d_optimizer')
  targets = None if teacher_logits is None else np.concatenate(
      [teacher_logits, teacher_feats, ds.train.y[:, None]],
      1)[None].astype(np.float32)
  init_fn = lambda k: kdgan_lib.init_state(
      model, disc, c_tx, d_tx, k, ds.train.x[:1], teacher_feats.shape[1],
      ds.num_classes)
  state, history, seconds = fit_group(
      _stage_dir(workdir, 'kdgan'), name='kdgan',
      member_step=kdgan_lib.make_member_step(
          model, disc, c_tx, d_tx, kd_loss(temperature, alpha),
          ds.num_classes, adv_weight=adv_weight,
          gumbel_temperature=gumbel_temperature),
      state=engine.init_group(init_fn, seed, [0]),
      predict=lambda s, xb: model.apply({'params': s['c'], **s['c_state']},
                                        xb),
      x=ds.train.x, targets=targets, ids=[0], epochs=epochs,
      batch_size=batch_size, seed=seed, strategy='auto', val_x=ds.val.x,
      val_targets=ds.val.y[None], val_metric=metrics.accuracy, writer=writer)
  state = engine.unstack(state, 1)[0]
  return model, {'params': state['c'], **state['c_state']}, {
      'history': history, 'seconds': seconds}


def train_baseline(stage, config, ds, predict_teacher, teacher_feats,
                   workdir, writer):
  """The Hinton-KD ('kd') or KDGAN ('kdgan') baseline of Table 3, trained
  and tested; returns its results.json entry. teacher_feats: the teacher's
  (raw, not PCA) features of the training images."""
  n, k = config.num_students, config.kd
  # The teacher's logits on the training images are needed only to train; a
  # finished stage (resume) is restored and tested.
  logits = None
  if (checkpoint.finished_epochs(_stage_dir(workdir, stage))
      < config[stage].epochs):
    logits = engine.batched(predict_teacher, ds.train.x,
                            config.eval_batch_size)
  common = dict(epochs=config[stage].epochs, temperature=k.temperature,
                alpha=k.alpha, batch_size=k.batch_size, optimizer=k.optimizer,
                learning_rate=k.learning_rate, seed=config.seed, impl=config.layers_impl, workdir=workdir,
                writer=writer)
  if stage == 'kd':
    model, variables, info = train_kd_student(
        per_n(config, 'kd.arch', n), logits, ds,
        weight_decay=k.weight_decay, **common)
  else:
    g = config.kdgan
    model, variables, info = train_kdgan_student(
        per_n(config, 'kd.arch', n), logits, teacher_feats, ds,
        adv_weight=g.adv_weight, gumbel_temperature=g.gumbel_temperature,
        disc_widths=[int(w) for w in str(g.disc).split()],
        d_optimizer=g.d_optimizer, d_learning_rate=g.d_learning_rate,
        **common)
  out = {'test_acc': evaluate(jax.jit(lambda xb: model.apply(variables, xb)),
                              ds.test.x, ds.test.y, config.eval_batch_size),
         'params': models.num_params(variables['params']),
         'temperature': k.temperature, 'alpha': k.alpha,
         'train_seconds': info['seconds']}
  if stage == 'kdgan':
    out.update(adv_weight=config.kdgan.adv_weight,
               gumbel_temperature=config.kdgan.gumbel_temperature)
  return out


def evaluate(predict, x, y, batch_size: int = 1000) -> float:
  """Test accuracy of a jitted `predict(images) -> logits`."""
  return metrics.accuracy(engine.batched(predict, x, batch_size), y)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the whole pipeline; returns and writes results.json."""
  validate(config)
  # -- distributed: join the other processes (tcn_jax.distributed); process
  # k > 0 keeps its lock, config and checkpoints in workdir/process<k>.
  dist = config.get('distributed')
  joined = dist is not None and distributed.initialize(
      dist.num_processes, dist.process_id, dist.coordinator)
  if joined:
    distributed.check_same_config(json.loads(config.to_json_best_effort()))
  if joined and dist.process_id:
    workdir = os.path.join(workdir, f'process{dist.process_id}')
  # -- end distributed
  with check_workdir(config, workdir), contextlib.closing(
      metrics.Writer(os.path.join(workdir, 'tensorboard'))) as writer:
    results = _pipeline(config, workdir, writer)
  if joined:
    distributed.shutdown()   # Waits for every process to finish.
  return results


def _pipeline(config, workdir, writer):
  """The stages of `run`, under its workdir lock."""
  n, wall, t = config.num_students, {}, time.time()
  ds = data_lib.load(config.data)
  wall['data'] = time.time() - t
  logging.info('data: %s from %s: train %d, val %d, test %d',
               config.data.name, ds.source, len(ds.train), len(ds.val),
               len(ds.test))
  shape, dtype = ds.train.x.shape[1:], ds.train.x.dtype
  features_lib.chunk_sizes(check_fits(
      'teacher.body', config.teacher.body, shape, config.layers_impl, dtype), n)
  for spec in dict.fromkeys(student_specs(config)):
    check_fits('students.arch', spec + ' D1', shape, config.layers_impl,
               dtype)
  if config.students.augment == 'flip':
    data_lib.hflip(ds.train.x[:1])   # Fails now on text, not after stage 1.
  # -- distributed: process k > 0 trains its share of the students only.
  if distributed.process_index() > 0:
    return _students_process(config, ds, workdir, writer, wall)
  # -- end distributed

  t, c = time.time(), config.teacher
  teacher = models.Teacher(c.body, ds.num_classes, c.head_dropout,
                           config.layers_impl, c.head_bn)
  teacher_vars, teacher_info = train_teacher(
      teacher, ds, epochs=c.epochs, batch_size=c.batch_size,
      optimizer=c.optimizer, learning_rate=c.learning_rate,
      weight_decay=c.weight_decay, lr_step_epochs=c.lr_step_epochs,
      lr_step_factor=c.lr_step_factor, seed=config.seed, workdir=workdir,
      writer=writer)
  wall['teacher'] = time.time() - t
  predict_teacher = jax.jit(lambda xb: teacher.apply(teacher_vars, xb))
  teacher_acc = evaluate(predict_teacher, ds.test.x, ds.test.y,
                         config.eval_batch_size)
  logging.info('teacher test accuracy %.4f', teacher_acc)

  t = time.time()
  feats = raw_feats = cached_features(teacher, teacher_vars, ds, workdir,
                                      config.eval_batch_size,
                                      config.students.augment)
  wall['features'] = time.time() - t

  basis = None
  if config.chunking == 'pca':   # Chunks of PCA coefficients, not slices.
    pca = features_lib.fit_pca(feats['train'])
    basis = features_lib.pca_basis(pca, features_lib.pca_order(
        pca['variance'], n, config.pca_assignment))
    feats = {s: features_lib.to_coefficients(f, basis)
             for s, f in feats.items()}

  t = time.time()
  shared = dict(feats, head=models.submodule_variables(teacher_vars, 'head'),
                basis=basis)
  groups, students_info = _students_stage(config, ds, shared, workdir, writer)
  wall['students'] = time.time() - t

  t, c = time.time(), config.head
  head_bn = config.teacher.head_bn and c.keep_teacher_bn
  tcn = assemble.TCN(groups, ds.num_classes,
                     float(per_n(config, 'head.dropout', n)),
                     assemble.teacher_head(teacher_vars, head_bn),
                     config.layers_impl, basis, head_bn)
  tcn, head_info = finetune_head(
      tcn, ds, epochs=per_n(config, 'head.epochs', n),
      batch_size=c.batch_size,
      optimizer=per_n(config, 'head.optimizer', n),
      learning_rate=c.learning_rate,
      seed=config.seed, strategy=config.students.strategy,
      eval_batch_size=config.eval_batch_size, workdir=workdir, writer=writer)
  wall['head'] = time.time() - t
  logging.info('TCN test accuracy: %.4f before, %.4f after fine-tuning',
               head_info['test_acc_before'], head_info['test_acc_after'])

  baselines = {}
  for stage in ('kd', 'kdgan'):
    if config[stage].enabled:
      t = time.time()
      baselines[stage] = train_baseline(stage, config, ds, predict_teacher,
                                        raw_feats['train'], workdir, writer)
      wall[stage] = time.time() - t
      logging.info('%s student test accuracy %.4f', stage,
                   baselines[stage]['test_acc'])

  assemble.save_tcn(os.path.join(workdir, 'tcn'), tcn)
  student_params = [models.num_params(g.variables['params'])
                    // len(g.member_ids)
                    for g in tcn.groups for _ in g.member_ids]
  results = {
      'dataset': config.data.name, 'data_source': ds.source,
      'num_students': n, 'method': config.method, 'seed': config.seed,
      'gan': gan_settings(config, n), 'kd': baselines.get('kd'),
      'kdgan': baselines.get('kdgan'),
      'chunking': config.chunking + (f' ({config.pca_assignment})'
                                     if basis is not None else ''),
      'backend': jax.default_backend(),
      'teacher_test_acc': teacher_acc,
      'student_val_mse': [h[-1] if h else None
                          for h in students_info['val_mse']],
      'tcn_test_acc_before_finetune': head_info['test_acc_before'],
      'tcn_test_acc_after_finetune': head_info['test_acc_after'],
      'params': {'teacher': models.num_params(teacher_vars['params']),
                 'students_each': student_params,
                 'students_total': int(sum(student_params)),
                 'head': models.num_params(tcn.head_variables['params'])},
      # Bitwise fingerprints: equal digests mean equal parameters.
      'digests': {'teacher': checkpoint.digest(teacher_vars),
                  'tcn': checkpoint.digest([g.variables for g in tcn.groups],
                                           tcn.head_variables)},
      'wall_seconds_this_run': wall,
      'train_seconds': {'teacher': teacher_info['seconds'],
                        'students': students_info['seconds'],
                        'head': head_info['seconds']},
  }
  if distributed.process_count() > 1:
    results['distributed'] = _distributed_record(students_info)
  checkpoint.write_json(os.path.join(workdir, 'results.json'), results)
  return results


# -- distributed (tcn_jax.distributed, docs/distributed.md) ------------------


def _students_stage(config, ds, shared, workdir, writer):
  """Stage 2 of the pipeline: all students, or with several processes this
  process's share (process 0 first sends `shared` to the others).

  shared: {'train', 'val' (and 'train_flip' with students.augment='flip'):
  the students' targets (features or PCA coefficients), 'head': the teacher
  head's variables, 'basis': PCA or None}.
  """
  n, c = config.num_students, config.students
  fit_students = train_students
  if distributed.process_count() > 1:
    shared = distributed.broadcast_tree(
        shared if distributed.process_index() == 0 else None)
    fit_students = distributed.train_students
  logit_match = None
  if c.logit_weight:
    t = config.teacher
    logit_match = dict(
        head=models.Head(ds.num_classes, t.head_dropout, bn=t.head_bn),
        head_variables=shared['head'], weight=c.logit_weight,
        temperature=c.logit_temperature, basis=shared['basis'])
  x, targets = ds.train.x, shared['train']
  if c.augment == 'flip':   # Mirrored images, with the teacher's features.
    x = np.concatenate([x, data_lib.hflip(x)])
    targets = np.concatenate([targets, shared['train_flip']])
  return fit_students(
      student_specs(config), x, targets, n,
      epochs=per_n(config, 'students.epochs', n), batch_size=c.batch_size,
      optimizer=c.optimizer, learning_rate=c.learning_rate,
      out_relu=c.out_relu, init=c.init, weight_decay=c.weight_decay,
      seed=config.seed, strategy=c.strategy, impl=config.layers_impl,
      val=(ds.val.x, shared['val']), gan=gan_settings(config, n),
      workdir=workdir, writer=writer, logit_match=logit_match,
      lr_schedule=c.lr_schedule)


def _distributed_record(students_info):
  p = distributed.process_count()
  return {'num_processes': p, 'process_id': distributed.process_index(),
          'members': [distributed.share(len(students_info['val_mse']), k, p)
                      for k in range(p)],
          'students_seconds_by_process': students_info['seconds_by_process']}


def _students_process(config, ds, workdir, writer, wall):
  """The pipeline of process k > 0: receives process 0's features, trains
  its share of the students, takes part in gathering them, and writes its
  own results.json (process 0 writes the run's)."""
  t = time.time()
  _, info = _students_stage(config, ds, None, workdir, writer)
  wall['students'] = time.time() - t
  results = {'distributed': _distributed_record(info),
             'student_val_mse': {m: info['val_mse'][m][-1]
                                 if info['val_mse'][m] else None
                                 for m in info['members']},
             'backend': jax.default_backend(),
             'wall_seconds_this_run': wall,
             'train_seconds': {'students': info['seconds']}}
  checkpoint.write_json(os.path.join(workdir, 'results.json'), results)
  return results
