"""Stage 2: n students regress the n chunks of the teacher's feature.

Identical students (same architecture and chunk width) form a group that
trains in one compiled program (`tcn_jax.engine`). FF students minimise a
regression loss picked by name (`losses.STUDENT_LOSSES`); GAN students add
an adversarial term against a discriminator each (`tcn_jax.gan`). On a mesh
(`tcn_jax.mesh`, any number of processes) a group's members are split over
its 'students' axis; students never communicate.
"""
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tcn_jax import assemble
from tcn_jax import augment
from tcn_jax import chunking
from tcn_jax import engine
from tcn_jax import fit
from tcn_jax import gan as gan_lib
from tcn_jax import input_pipeline
from tcn_jax import inputs
from tcn_jax import losses
from tcn_jax import metrics
from tcn_jax import models
from tcn_jax import optim
from tcn_jax import record
from tcn_jax import teacher as teacher_lib
from tcn_jax import workdir as workdir_lib
from tcn_jax.errors import TCNError


def _targets(loss_name, encoded, chunks, bounds, member_ids, lazy=False):
  """The group's member-stacked target dict (see `tcn_jax.losses`); `lazy`
  (streamed inputs): `input_pipeline.StackedRows`, read batch by batch."""
  stack = input_pipeline.StackedRows if lazy else np.stack
  targets = {'chunk': stack([chunks[i] for i in member_ids])}
  if losses.STUDENT_LOSSES.get(loss_name).needs_feature:
    n = len(encoded)
    targets['feature'] = stack([encoded] * len(member_ids))
    targets['offset'] = np.stack([np.full(n, bounds[i][0], np.int32)
                                  for i in member_ids])
  return targets


def _online_targets(online, loss_name, bounds, member_ids, seed):
  """The group's targets computed inside its step from the batch: the frozen
  teacher's features (inference mode), encoded and cut as `_targets`; with
  online['views'] (an augmentation's name), of each batch's random view
  (`augment.view`), the one every student is trained on."""
  teacher = online['teacher']
  needs_feature = losses.STUDENT_LOSSES.get(loss_name).needs_feature

  def fn(ctx, xb):
    f = teacher.apply(ctx['teacher'], xb, method=teacher.features)
    f = chunking.encode_with(ctx['basis'], f)
    targets = {'chunk': jnp.stack([f[:, bounds[i][0]:bounds[i][1]]
                                   for i in member_ids])}
    if needs_feature:
      targets['feature'] = jnp.stack([f] * len(member_ids))
      targets['offset'] = jnp.stack([jnp.full(len(xb), bounds[i][0],
                                              jnp.int32) for i in member_ids])
    return targets

  basis = online['chunker'].basis
  views = online.get('views') or ''
  return fit.OnlineTargets(fn, {
      'teacher': online['variables'],
      'basis': None if basis is None else {k: jnp.asarray(v)
                                           for k, v in basis.items()}},
      view=functools.partial(augment.view, augment.check_view(views))
      if views else None, view_seed=augment.view_seed(seed))


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """How the students' parameters are updated.

  Attributes:
    name: an optimizer of `optim.OPTIMIZERS` ('adam', 'nadam', 'sgd').
    learning_rate: its learning rate.
    schedule: 'constant' (the paper) or 'cosine' (to 0 over the epochs).
    weight_decay: L2 of the kernels added to the loss.
  """
  name: str = 'adam'
  learning_rate: float = 1e-3
  schedule: str = 'constant'
  weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class Nets:
  """How the student architectures become Flax modules.

  Attributes:
    out_relu: a ReLU on each student's output (the teacher's features are
      post-ReLU).
    init: the output layer's initializer.
    impl: the convolution implementation ('auto', 'im2col', 'xla').
    dtype: the compute dtype (e.g. jnp.bfloat16; parameters stay float32);
      None: float32.
  """
  out_relu: bool = False
  init: str = 'normal'
  impl: str = 'auto'
  dtype: Any = None


@dataclasses.dataclass(frozen=True)
class Objective:
  """What each student minimises.

  Attributes:
    loss: the regression loss's name in `losses.STUDENT_LOSSES`.
    loss_context: what that loss needs (e.g. logit matching: head,
      head_variables, weight, temperature, chunker).
    gan: None for FF students, or a dict of GAN settings (`gan_settings`).
    online: None (targets are `features`), or the frozen teacher computing
      them from each batch: {'teacher', 'variables', 'chunker'} and
      optionally 'views', an augmentation's name (`augment.view`): each
      batch is replaced on device by a random view of it, the teacher's
      features computed from the same view.
  """
  loss: str = 'mse'
  loss_context: Any = None
  gan: Any = None
  online: Any = None


def train_students(specs, x, features, num_students, *, epochs,
                   batch_size=128, optimizer: Optimizer = Optimizer(),
                   nets: Nets = Nets(), objective: Objective = Objective(),
                   val=None, seed=0, strategy='auto', workdir=None,
                   writer=None, members=None, evaluate=None):
  """Trains n students on the n contiguous chunks of `features`.

  Args:
    specs: one architecture string for all students, or one per student.
    x: (N, ...) training inputs (or a streamed `input_pipeline.Stream`);
      every student sees all of them.
    features: (N, D) targets (teacher features, or PCA coefficients).
    num_students: n.
    epochs: passes over x.
    batch_size: examples per step.
    optimizer: an `Optimizer` (name, learning rate, schedule, weight decay).
    nets: `Nets` (output ReLU, initializer, convolutions, compute dtype).
    objective: an `Objective` (regression loss, GAN, online features).
    val: optional (x_val, features_val), scored (MSE) after each epoch.
    seed: the run's seed.
    strategy: how a device runs its students (`engine.STRATEGIES`).
    workdir: checkpoints go to `workdir/students/group<g>` (None: unsaved).
    writer: optional TensorBoard writer.
    members: train only these member ids; the groups returned hold only
      them.
    evaluate: optional evaluate(outputs) -> a dict of scalars after each
      epoch, outputs(x) -> (B, D) every student's output concatenated in
      chunk order (e.g. the TCN's accuracy through a head); only when one
      group trains every student (identical architectures), else unused.

  Returns:
    (groups, info): `assemble.StudentGroup`s with trained variables; info =
    {'val_mse': per student, its MSE per epoch, 'history', 'seconds'}.
  """
  inputs.count('train_students', 'num_students', num_students)
  for name, value, kind in (('optimizer', optimizer, Optimizer),
                            ('nets', nets, Nets),
                            ('objective', objective, Objective)):
    if not isinstance(value, kind):
      raise TCNError(f'train_students: {name} must be a tcn_jax.students.'
                     f'{kind.__name__}, got {value!r}')
  out_relu, init, impl, dtype = (nets.out_relu, nets.init, nets.impl,
                                 nets.dtype)
  loss, loss_context, gan, online = (objective.loss, objective.loss_context,
                                     objective.gan, objective.online)
  if isinstance(specs, str):
    specs = [specs] * num_students
  if len(specs) != num_students:
    raise TCNError(f'{len(specs)} student architectures given for '
                   f'num_students={num_students}')
  where = 'train_students'
  inputs.epochs(where, epochs)
  streamed = isinstance(x, input_pipeline.Stream)   # Checked as it is read.
  if not streamed:
    x = inputs.batch(where, 'x', x, spec=specs[0])
  if online is None:
    features = np.asarray(features if streamed else inputs.features(
        where, 'features', features, len(x)))
    dim = features.shape[1]
    chunks = chunking.chunk(features, num_students)
  else:
    dim = online['chunker'].dim
  if val is not None:
    val_x = inputs.batch(where, 'val[0]', val[0], spec=specs[0],
                         shape=None if streamed else x.shape[1:])
    val = (val_x, inputs.features(where, 'val[1]', val[1], len(val_x), dim))
  sizes = chunking.chunk_sizes(dim, num_students)
  bounds = chunking.chunk_bounds(dim, num_students)
  groups = assemble.group_students(specs, sizes, out_relu, init)
  shape = (val[0].shape[1:] if val is not None else None) if streamed else (
      x.shape[1:])
  for g in groups:
    g.input_shape = None if shape is None else tuple(shape)
  if val is not None:
    val_x, val_chunks = val[0], chunking.chunk(val[1], num_students)
  elif online is None:
    val_x, val_chunks = x[:1], [c[:1] for c in chunks]
  else:
    raise TCNError('online features need val=(x_val, val features)')
  seed = fit.stage_seed(seed, 'students')
  lr = optim.schedule(optimizer.schedule, optimizer.learning_rate,
                      epochs=epochs, steps_per_epoch=len(x) // batch_size)
  tx = optim.make_optimizer(optimizer.name, lr, 'config.students.optimizer')
  val_mse, histories, seconds = {}, [], 0.0
  whole = len(groups) == 1 and (members is None
                                or set(members) >= set(range(num_students)))
  evaluate_group = evaluate and whole and (
      lambda outputs: evaluate(lambda xb: _concatenate(outputs(xb))))
  for gi, group in enumerate(groups):
    if members is not None:   # gi stays the index among all groups.
      group.member_ids = [m for m in group.member_ids if m in members]
      if not group.member_ids:
        continue
    model = group.model(impl, dtype)
    regression = losses.STUDENT_LOSSES.get(loss)(group.out_dim,
                                                 **(loss_context or {}))
    if online is None:
      targets = _targets(loss, features, chunks, bounds, group.member_ids,
                         lazy=isinstance(x, input_pipeline.Stream))
    common = dict(
        name=stage_name(group.member_ids), x=x, ids=group.member_ids,
        targets=targets if online is None else {},
        target_fn=online and _online_targets(online, loss, bounds,
                                             group.member_ids, seed),
        epochs=epochs, batch_size=batch_size, seed=seed, strategy=strategy,
        val_x=val_x, val_metric=metrics.mse, writer=writer,
        val_targets=np.stack([val_chunks[i] for i in group.member_ids]),
        evaluate=evaluate_group or None)
    stage_dir = workdir and os.path.join(workdir, 'students',
                                         f'group{gi}')
    if gan is None:
      init_fn = lambda k, model=model: model.init(k, x[:1])
      group.variables, hist, secs = fit.fit(
          stage_dir, model=model, loss=regression, tx=tx,
          variables=engine.init_group(init_fn, seed, group.member_ids),
          weight_decay=optimizer.weight_decay, **common)
    else:
      disc = gan_lib.Discriminator(gan['disc_widths'], group.out_dim,
                                   gan['disc_first_bias'], gan['recon_relu'])
      d_tx = optim.make_optimizer(gan['d_optimizer'], gan['d_learning_rate'],
                                  'config.gan.d_optimizer')
      init_fn = lambda k, model=model, disc=disc, d_tx=d_tx: (
          gan_lib.init_state(model, disc, tx, d_tx, k, x[:1]))
      state, hist, secs = fit.fit_group(
          stage_dir, state=engine.init_group(init_fn, seed, group.member_ids),
          member_step=gan_lib.make_member_step(
              model, disc, tx, d_tx, mse_target=gan['mse_target'],
              adv_weight=gan['adv_weight'], mse_weight=gan['mse_weight'],
              g_steps_per_d_step=gan['g_steps_per_d_step'],
              regression=regression),
          predict=lambda s, xb, model=model: model.apply(s.variables(), xb),
          **common)
      group.variables = state.variables()
    for i, mid in enumerate(group.member_ids):
      val_mse[mid] = [h['val'][i] for h in hist] if val is not None else []
    histories.append(hist)
    seconds += secs
  groups = [g for g in groups if g.member_ids]   # members= may drop some.
  return groups, {'val_mse': [val_mse.get(i, []) for i in range(num_students)],
                  'history': histories, 'seconds': seconds}


def _concatenate(outputs):
  """(members, B, d) outputs -> (B, members * d), member 0's first."""
  return jnp.concatenate(list(outputs), axis=-1)


def stage_name(ids) -> str:
  """A student group's name in logs and progress, by its members' ids (from
  0): `students[3]`, `students[0,1]`, `students[0-7]` (a run of 3 or more),
  so that a group of n students does not read as one student."""
  ids = sorted(int(i) for i in ids)
  if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
    return f'students[{ids[0]}-{ids[-1]}]'
  return f"students[{','.join(map(str, ids))}]"


def gan_settings(config):
  """The GAN students' settings from the resolved `config.gan` (None for
  FF students)."""
  if config.method != 'gan':
    return None
  g = config.gan
  return {'disc_widths': tuple(int(w) for w in str(g.disc).split()),
          'disc_first_bias': g.disc_first_bias, 'recon_relu': g.recon_relu,
          'mse_target': g.mse_target, 'adv_weight': g.adv_weight,
          'mse_weight': g.mse_weight,
          'g_steps_per_d_step': g.g_steps_per_d_step,
          'd_optimizer': g.d_optimizer, 'd_learning_rate': g.d_learning_rate}


def key(run: record.Run, features_key: str) -> str:
  """The students stage's key."""
  c = run.config
  return workdir_lib.stage_key(
      stage='students', features=features_key, n=c.num_students,
      method=c.method, chunking=c.chunking, pca_assignment=c.pca_assignment,
      students={**workdir_lib.section_key(
          {k: v for k, v in c.students.to_dict().items()
           if k != 'eval_tcn'},   # Scores only: trains the same.
          added=('features', 'views')),
          'augment': augment.key_name(c.data.augment)},
      gan=c.gan.to_dict() if c.method == 'gan' else None,
      layers_impl=c.layers_impl, seed=c.seed, data=run.data_key,
      **workdir_lib.dtype_key(c))


def shared_inputs(run: record.Run, teacher: record.Teacher,
                  feats: record.Features, key: str) -> dict:
  """What every process's students need from process 0: the fitted
  chunking's basis, the encoded features, the teacher head, the key."""
  c = run.config
  online = feats.train is None   # Online: chunks fitted on val's features.
  chunker = chunking.fit(c.chunking, feats.val if online else feats.train,
                         c.num_students, c.pca_assignment)
  shared = {'train': None if online else chunker.encode(feats.train),
            'val': chunker.encode(feats.val),
            'head': models.submodule_variables(teacher.variables, 'head'),
            'basis': chunker.basis, 'key': key}
  if online:
    shared['teacher'] = teacher.variables
  if feats.train_flip is not None:
    shared['train_flip'] = chunker.encode(feats.train_flip)
  return shared


def run_stage(run: record.Run, shared: dict,
              specs: list[str]) -> record.Students:
  """The pipeline's students stage. shared: `shared_inputs` (process 0's,
  with several processes); specs: one architecture per student."""
  c, ds = run.config, run.ds
  s = c.students
  chunker = chunking.Chunker(c.num_students, shared['val'].shape[1],
                             shared['basis'])
  t = c.teacher
  context = dict(head=models.Head(ds.num_classes, t.head_dropout,
                                  bn=t.head_bn),
                 head_variables=shared['head'], weight=s.logit_weight,
                 temperature=s.logit_temperature, chunker=chunker,
                 settings=s.to_dict())   # A loss's own fields, by name.
  x, targets = ds.train.x, shared['train']
  online = None
  if targets is None:   # Online features (features.run_stage chose).
    online = {'teacher': teacher_lib.model(run),
              'variables': shared['teacher'], 'chunker': chunker,
              'views': s.views}
  if augment.get(c.data.augment).mirrored_copies:   # With their features.
    x = np.concatenate([x, augment.hflip(x)])
    if online is None:
      targets = np.concatenate([targets, shared['train_flip']])
  evaluate = None
  if s.eval_tcn:   # The TCN with the teacher's frozen head, per epoch.
    head, head_variables = context['head'], context['head_variables']
    logits = jax.jit(lambda f: head.apply(head_variables, chunker.decode(f)))

    def evaluate(outputs):
      return {f'tcn_{split}_acc': metrics.accuracy(input_pipeline.batched(
          lambda xb: logits(outputs(xb)), getattr(ds, split).x,
          c.eval_batch_size), getattr(ds, split).y) for split in ('val',
                                                                  'test')}
  groups, info = train_students(
      specs, x, targets, c.num_students, epochs=s.epochs,
      batch_size=s.batch_size,
      optimizer=Optimizer(s.optimizer, s.learning_rate, s.lr_schedule,
                          s.weight_decay),
      nets=Nets(s.out_relu, s.init, c.layers_impl, models.compute_dtype(c)),
      objective=Objective(s.loss, context, gan_settings(c), online),
      val=(ds.val.x, shared['val']), seed=c.seed, strategy=s.strategy,
      workdir=run.workdir or None, writer=run.writer, evaluate=evaluate)
  return record.Students(groups, chunker, info, shared['key'])
