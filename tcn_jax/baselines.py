"""The paper's Table 3 baselines: Hinton KD and KDGAN, one classifier
student with about the n TCN students' parameters, distilled from the same
teacher (optional stages: `config.kd.enabled`, `config.kdgan.enabled`)."""
import os

import numpy as np

from tcn_jax import checkpoint
from tcn_jax import engine
from tcn_jax import fit
from tcn_jax import input_pipeline
from tcn_jax import kdgan as kdgan_lib
from tcn_jax import losses
from tcn_jax import mesh as mesh_lib
from tcn_jax import metrics
from tcn_jax import models
from tcn_jax import optim
from tcn_jax import record
from tcn_jax import workdir as workdir_lib


def train_kd_student(spec, teacher_logits, ds, *, epochs, temperature=4.0,
                     alpha=0.9, batch_size=128, optimizer='adam',
                     learning_rate=1e-3, init='glorot_uniform',
                     weight_decay=0.0, seed=0, impl='auto', workdir=None,
                     writer=None, dtype=None):
  """One classifier student (`spec` + Dense(classes)) trained on the
  teacher's softened logits plus labels (`losses.kd`). `teacher_logits` may
  be None when the stage is finished (resume): it is then only restored.

  Returns (model, variables, info = {'history', 'seconds'})."""
  model = models.Net(f'{spec} D{ds.num_classes}', init, impl, dtype)
  seed = fit.stage_seed(seed, 'kd')
  targets = None if teacher_logits is None else {
      'logits': np.asarray(teacher_logits, np.float32)[None],
      'label': ds.train.y[None]}
  variables, history, seconds = fit.fit(
      workdir and os.path.join(workdir, 'kd'), name='kd', model=model,
      loss=losses.kd(temperature, alpha),
      tx=optim.make_optimizer(optimizer, learning_rate, 'config.kd.optimizer'),
      variables=engine.init_group(lambda k: model.init(k, ds.train.x[:1]),
                                  seed, [0]),
      x=ds.train.x, targets=targets, ids=[0], epochs=epochs,
      batch_size=batch_size, seed=seed, strategy='auto', val_x=ds.val.x,
      val_targets=ds.val.y[None], val_metric=metrics.accuracy, writer=writer,
      weight_decay=weight_decay)
  return model, engine.unstack(variables, 1)[0], {'history': history,
                                                  'seconds': seconds}


def train_kdgan_student(spec, teacher_logits, teacher_feats, ds, *, epochs,
                        temperature=4.0, alpha=0.9, adv_weight=1.0,
                        gumbel_temperature=1.0, disc_widths=(256, 128),
                        batch_size=128, optimizer='adam', learning_rate=1e-3,
                        d_optimizer='adam', d_learning_rate=2e-4,
                        init='glorot_uniform', seed=0, impl='auto',
                        workdir=None, writer=None, dtype=None):
  """The KD student plus KDGAN's adversarial label game (`tcn_jax.kdgan`).
  `teacher_logits` may be None when the stage is finished, as in
  `train_kd_student`. Returns (model, variables, info)."""
  model = models.Net(f'{spec} D{ds.num_classes}', init, impl, dtype)
  disc = kdgan_lib.LabelDiscriminator(tuple(disc_widths))
  seed = fit.stage_seed(seed, 'kdgan')
  c_tx = optim.make_optimizer(optimizer, learning_rate, 'config.kd.optimizer')
  d_tx = optim.make_optimizer(d_optimizer, d_learning_rate,
                              'config.kdgan.d_optimizer')
  targets = None if teacher_logits is None else {
      'logits': np.asarray(teacher_logits, np.float32)[None],
      'feature': np.asarray(teacher_feats, np.float32)[None],
      'label': ds.train.y[None]}
  init_fn = lambda k: kdgan_lib.init_state(
      model, disc, c_tx, d_tx, k, ds.train.x[:1], teacher_feats.shape[1],
      ds.num_classes)
  state, history, seconds = fit.fit_group(
      workdir and os.path.join(workdir, 'kdgan'), name='kdgan',
      member_step=kdgan_lib.make_member_step(
          model, disc, c_tx, d_tx, losses.kd(temperature, alpha),
          ds.num_classes, adv_weight=adv_weight,
          gumbel_temperature=gumbel_temperature),
      state=engine.init_group(init_fn, seed, [0]),
      predict=lambda s, xb: model.apply(s.variables(), xb),
      x=ds.train.x, targets=targets, ids=[0], epochs=epochs,
      batch_size=batch_size, seed=seed, strategy='auto', val_x=ds.val.x,
      val_targets=ds.val.y[None], val_metric=metrics.accuracy, writer=writer)
  return model, engine.unstack(state.variables(), 1)[0], {
      'history': history, 'seconds': seconds}


def key(run: record.Run, stage: str, teacher_key: str,
        features_key: str) -> str:
  """The key of baseline `stage` ('kd' or 'kdgan')."""
  c = run.config
  return workdir_lib.stage_key(
      stage=stage, teacher=teacher_key,
      features=features_key if stage == 'kdgan' else None,
      kd=c.kd.to_dict(), kdgan=c.kdgan.to_dict() if stage == 'kdgan' else None,
      layers_impl=c.layers_impl, eval_batch_size=c.eval_batch_size,
      seed=c.seed, data=run.data_key, **workdir_lib.dtype_key(c))


def run_stage(run: record.Run, stage: str, teacher: record.Teacher,
              feats: record.Features) -> dict:
  """Trains and tests baseline `stage`; returns its results.json entry."""
  c, ds, k = run.config, run.ds, run.config.kd
  # The teacher's logits on the training images are needed only to train; a
  # finished stage (resume) is restored and tested.
  logits = None
  if (checkpoint.finished_epochs(run.workdir and
                                 os.path.join(run.workdir, stage))
      < c[stage].epochs):
    predict_teacher = (getattr(teacher.model, 'host_logits', None)  # ONNX
                       or mesh_lib.forward(teacher.model.apply,
                                           teacher.variables))
    logits = input_pipeline.batched(predict_teacher, ds.train.x, c.eval_batch_size)
  common = dict(epochs=c[stage].epochs, temperature=k.temperature,
                alpha=k.alpha, batch_size=k.batch_size, optimizer=k.optimizer,
                learning_rate=k.learning_rate, seed=c.seed,
                impl=c.layers_impl, workdir=run.workdir or None,
                writer=run.writer, dtype=models.compute_dtype(c))
  if stage == 'kd':
    model, variables, info = train_kd_student(
        k.arch, logits, ds, weight_decay=k.weight_decay, **common)
  else:
    g = c.kdgan
    model, variables, info = train_kdgan_student(
        k.arch, logits, feats.train, ds, adv_weight=g.adv_weight,
        gumbel_temperature=g.gumbel_temperature,
        disc_widths=[int(w) for w in str(g.disc).split()],
        d_optimizer=g.d_optimizer, d_learning_rate=g.d_learning_rate,
        **common)
  predict = mesh_lib.forward(model.apply, variables)
  out = {'test_acc': metrics.evaluate(predict, ds.test.x, ds.test.y,
                                      c.eval_batch_size),
         'params': models.num_params(variables['params']),
         'temperature': k.temperature, 'alpha': k.alpha,
         'train_seconds': info['seconds'],
         # Bitwise fingerprint: a resumed run gives the same student.
         'digest': checkpoint.digest(variables)}
  if stage == 'kdgan':
    out.update(adv_weight=c.kdgan.adv_weight,
               gumbel_temperature=c.kdgan.gumbel_temperature)
  return out
