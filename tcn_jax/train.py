"""The pipeline's stages as plain functions over explicit state.

teacher -> features (cached) -> chunks -> students (one program per group)
-> assemble -> evaluate -> fine-tune head -> evaluate -> save TCN.
Every stage checkpoints per epoch under the workdir and is resumed or skipped
when the same command runs again.
"""
import fcntl
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tcn_jax import assemble
from tcn_jax import checkpoint
from tcn_jax import data as data_lib
from tcn_jax import engine
from tcn_jax import features as features_lib
from tcn_jax import metrics
from tcn_jax import models
from tcn_jax.errors import TCNError

STAGES = ('teacher', 'students', 'head')
METHODS = ('ff',)


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


def per_n(section, field: str, n: int):
  """`section.field`, or for an unset one (''/-1) `section.field_by_n[n]`."""
  value = section[field]
  if value not in ('', -1, -1.0, None):
    return value
  table = section.get(field + '_by_n') or {}
  if str(n) not in table:
    raise TCNError(f'no {field} for num_students={n}: set --config.'
                   f'<section>.{field} (paper values exist for '
                   f'n in {sorted(table, key=int)})')
  return table[str(n)]


def stage_seed(seed: int, stage: str) -> int:
  return int(np.random.SeedSequence([seed, STAGES.index(stage)])
             .generate_state(1)[0])


def ce_loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mse_loss(pred, target):
  return jnp.mean((pred - target) ** 2)


def fit(stage_dir, *, name, model, loss, tx, params, x, targets, ids, epochs,
        batch_size, seed, strategy, val_x, val_targets, val_metric, writer):
  """Trains a stacked group for `epochs`, resuming from `stage_dir`.

  loss(pred, target) is the per-member loss; val_metric(pred, target) is
  reported per member after each epoch. Returns (params, history).
  """
  n = len(ids)
  opt_state = jax.vmap(tx.init)(params)
  ckpt = checkpoint.StageCheckpoint(stage_dir)
  start, history, seconds = ckpt.latest_epoch(), [], 0.0
  if start:
    state, record = ckpt.restore({'params': params, 'opt_state': opt_state})
    params, opt_state = state['params'], state['opt_state']
    history, seconds = record['history'], record['seconds']
    logging.info('[%s] resuming after epoch %d/%d', name, start, epochs)
  if start >= epochs:
    ckpt.close()
    return params, history, seconds

  def loss_fn(p, xb, tb, key):
    pred = model.apply({'params': p}, xb, train=True, rngs={'dropout': key})
    return loss(pred, tb)

  epoch_fn = engine.make_epoch_fn(loss_fn, tx, n, strategy)
  apply = engine.make_apply_fn(
      lambda p, xb: model.apply({'params': p}, xb), n, strategy)
  keys = engine.member_keys(seed, ids)
  x_dev, t_dev = jnp.asarray(x), jnp.asarray(targets)
  progress = metrics.Progress(name, epochs, start)
  for epoch in range(start, epochs):
    t0 = time.time()
    order = engine.batch_order(seed, epoch, len(x), batch_size)
    params, opt_state, losses = epoch_fn(params, opt_state, x_dev, t_dev,
                                         order, keys, epoch)
    losses = np.asarray(losses)
    bad = np.argwhere(~np.isfinite(losses))
    if len(bad):
      step, member = bad[0]
      raise TCNError(f'non-finite loss in stage {name}, member {ids[member]}, '
                     f'epoch {epoch + 1}, step {step}; last good checkpoint: '
                     f'epoch {epoch} in {stage_dir}')
    preds = engine.batched(lambda xb: apply(params, xb), val_x, axis=1)
    val = [val_metric(preds[m], val_targets[m]) for m in range(n)]
    seconds += time.time() - t0
    record = {'epoch': epoch + 1, 'train_loss': losses.mean(0).tolist(),
              'val': val, 'seconds': seconds}
    history.append(record)
    ckpt.save(epoch + 1, {'params': params, 'opt_state': opt_state},
              {'history': history, 'seconds': seconds})
    scalars = {f'{name}/train_loss/{i}': l for i, l in
               zip(ids, record['train_loss'])}
    scalars.update({f'{name}/val/{i}': v for i, v in zip(ids, val)})
    writer.scalars(epoch + 1, scalars)
    progress.epoch(epoch + 1, {'loss': float(losses[-len(losses) // 10 - 1:]
                                             .mean()),
                               'val': float(np.mean(val))})
  ckpt.close()
  return params, history, seconds


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
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, '<unset>'), new.get(k, '<unset>')
    if k == 'allow_config_change':
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f'{prefix}{k}.')
    elif a != b:
      out.append(f'{prefix}{k}: {a!r} -> {b!r}')
  return out


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
  for section in ('teacher', 'students', 'head'):
    for field in ('epochs', 'batch_size'):
      value = per_n(config[section], field, n)
      if not isinstance(value, int) or value < (0 if field == 'epochs' else 1):
        raise TCNError(f'config.{section}.{field} must be a '
                       f'{"non-negative" if field == "epochs" else "positive"}'
                       f' integer, got {value!r}')


def train_teacher(config, ds, workdir, writer):
  """Stage 1: the teacher, trained with cross-entropy (or restored)."""
  c = config.teacher
  teacher = models.Teacher(c.body, ds.num_classes, c.head_dropout,
                           config.layers_impl)
  seed = stage_seed(config.seed, 'teacher')
  init = lambda k: teacher.init(k, ds.train.x[:1])['params']
  params = engine.init_group(init, seed, [0])
  params, history, seconds = fit(
      os.path.join(workdir, 'teacher'), name='teacher', model=teacher,
      loss=ce_loss, tx=make_optimizer(c.optimizer, c.learning_rate,
                                      'config.teacher.optimizer'),
      params=params, x=ds.train.x, targets=ds.train.y[None], ids=[0],
      epochs=c.epochs, batch_size=c.batch_size, seed=seed,
      strategy='auto', val_x=ds.val.x, val_targets=ds.val.y[None],
      val_metric=metrics.accuracy, writer=writer)
  return teacher, engine.unstack(params, 1)[0], history, seconds


def cached_features(teacher, params, ds, workdir, batch_size):
  """Teacher features of train/val, computed once and kept in the workdir."""
  path = os.path.join(workdir, 'features.npz')
  if os.path.exists(path):
    with np.load(path) as f:
      if f['train'].shape[0] == len(ds.train) and f['val'].shape[0] == len(
          ds.val):
        return {'train': f['train'], 'val': f['val']}
  feats = {s: features_lib.teacher_features(teacher, params, getattr(ds, s).x,
                                            batch_size)
           for s in ('train', 'val')}
  tmp = path + '.tmp.npz'
  np.savez(tmp, **feats)
  os.replace(tmp, path)
  return feats


def train_students(config, ds, feats, workdir, writer):
  """Stage 2: all students, one compiled program per group of identical ones."""
  c, n = config.students, config.num_students
  dim = feats['train'].shape[1]
  sizes = features_lib.chunk_sizes(dim, n)
  spec = per_n(c, 'arch', n)
  tcn = assemble.TCN(
      assemble.group_students([spec] * n, sizes, c.out_relu, c.init),
      ds.num_classes, float(per_n(config.head, 'dropout', n)),
      impl=config.layers_impl)
  train_chunks = features_lib.chunk(feats['train'], n)
  val_chunks = features_lib.chunk(feats['val'], n)
  seed = stage_seed(config.seed, 'students')
  histories, seconds = {}, 0.0
  for gi, group in enumerate(tcn.groups):
    model = group.model(config.layers_impl)
    init = lambda k, model=model: model.init(k, ds.train.x[:1])['params']
    params = engine.init_group(init, seed, group.member_ids)
    group.params, hist, secs = fit(
        os.path.join(workdir, 'students', f'group{gi}'),
        name=f'students[{gi}]', model=model, loss=mse_loss,
        tx=make_optimizer(c.optimizer, c.learning_rate,
                          'config.students.optimizer'),
        params=params, x=ds.train.x,
        targets=np.stack([train_chunks[i] for i in group.member_ids]),
        ids=group.member_ids, epochs=per_n(c, 'epochs', n),
        batch_size=c.batch_size, seed=seed, strategy=c.strategy,
        val_x=ds.val.x,
        val_targets=np.stack([val_chunks[i] for i in group.member_ids]),
        val_metric=metrics.mse, writer=writer)
    for i, mid in enumerate(group.member_ids):
      histories[mid] = [h['val'][i] for h in hist]
    seconds += secs
  return tcn, histories, seconds


def finetune_head(config, tcn, teacher_head, ds, workdir, writer):
  """Stage 3: head initialised from the teacher's, trained with CE on frozen
  student outputs. Returns accuracies before and after fine-tuning."""
  c, n = config.head, config.num_students
  outputs = assemble.student_outputs_fn(tcn, config.students.strategy)
  group_params = [g.params for g in tcn.groups]
  feats = {s: engine.batched(lambda xb: outputs(group_params, xb),
                             getattr(ds, s).x, config.eval_batch_size)
           for s in ('train', 'val', 'test')}
  head = models.Head(ds.num_classes, tcn.head_dropout)
  logits = lambda p, f: np.asarray(head.apply({'params': p}, f))
  before = metrics.accuracy(logits(teacher_head, feats['test']), ds.test.y)
  seed = stage_seed(config.seed, 'head')
  params, history, seconds = fit(
      os.path.join(workdir, 'head'), name='head', model=head, loss=ce_loss,
      tx=make_optimizer(per_n(c, 'optimizer', n), c.learning_rate,
                        'config.head.optimizer'),
      params=engine.stack([teacher_head]), x=feats['train'],
      targets=ds.train.y[None], ids=[0], epochs=per_n(c, 'epochs', n),
      batch_size=c.batch_size, seed=seed, strategy='auto',
      val_x=feats['val'], val_targets=ds.val.y[None],
      val_metric=metrics.accuracy, writer=writer)
  tcn.head_params = engine.unstack(params, 1)[0]
  after = metrics.accuracy(logits(tcn.head_params, feats['test']), ds.test.y)
  return before, after, history, seconds


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the whole pipeline; returns and writes results.json."""
  validate(config)
  lock = check_workdir(config, workdir)
  writer = metrics.Writer(os.path.join(workdir, 'tensorboard'))
  wall, t = {}, time.time()
  ds = data_lib.load(config.data)
  wall['data'] = time.time() - t
  logging.info('data: %s from %s: train %d, val %d, test %d',
               config.data.name, ds.source, len(ds.train), len(ds.val),
               len(ds.test))

  t = time.time()
  teacher, teacher_params, _, teacher_train_s = train_teacher(
      config, ds, workdir, writer)
  wall['teacher'] = time.time() - t
  teacher_logits = engine.batched(
      jax.jit(lambda xb: teacher.apply({'params': teacher_params}, xb)),
      ds.test.x, config.eval_batch_size)
  teacher_acc = metrics.accuracy(teacher_logits, ds.test.y)
  logging.info('teacher test accuracy %.4f', teacher_acc)

  t = time.time()
  feats = cached_features(teacher, teacher_params, ds, workdir,
                          config.eval_batch_size)
  wall['features'] = time.time() - t

  t = time.time()
  tcn, mse_history, students_train_s = train_students(config, ds, feats,
                                                      workdir, writer)
  wall['students'] = time.time() - t

  t = time.time()
  before, after, _, head_train_s = finetune_head(
      config, tcn, teacher_params['head'], ds, workdir, writer)
  wall['head'] = time.time() - t
  logging.info('TCN test accuracy: %.4f before, %.4f after fine-tuning',
               before, after)

  assemble.save_tcn(os.path.join(workdir, 'tcn'), tcn)
  student_params = [models.num_params(g.params) // len(g.member_ids)
                    for g in tcn.groups for _ in g.member_ids]
  results = {
      'dataset': config.data.name, 'data_source': ds.source,
      'num_students': config.num_students, 'method': config.method,
      'seed': config.seed, 'backend': jax.default_backend(),
      'teacher_test_acc': teacher_acc,
      'student_val_mse': [mse_history[i][-1] if mse_history[i] else None
                          for i in range(config.num_students)],
      'tcn_test_acc_before_finetune': before,
      'tcn_test_acc_after_finetune': after,
      'params': {'teacher': models.num_params(teacher_params),
                 'students_each': student_params,
                 'students_total': int(sum(student_params)),
                 'head': models.num_params(tcn.head_params)},
      'wall_seconds_this_run': wall,
      'train_seconds': {'teacher': teacher_train_s,
                        'students': students_train_s, 'head': head_train_s},
  }
  checkpoint.write_json(os.path.join(workdir, 'results.json'), results)
  writer.close()
  lock.close()
  return results
