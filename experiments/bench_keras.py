"""Benchmark: the authors' Keras models against tcn_jax, in one process.

The Fashion-MNIST teacher (body 'C32 C64 MP Do.25 F D256r D256r', head
Dropout 0.5 + Dense 10, Adam 1e-3, batch 256) and the n = 4 student
('C32 C32 MP C16 C16 MP Do.25 F D16r Do.3' + Dense 64, init normal(0.05),
Adam 1e-3, MSE, batch 128) written in Keras (TensorFlow CPU, `pip install
'.[bench]'`) as in the reference notebooks, against the same models trained
by tcn_jax's engine exactly as `fit.fit` trains them (strategy `auto`), on
the real Fashion-MNIST training images (48k):

  teacher          Keras vs ours;
  one student      Keras vs ours (a group of one);
  four students    Keras, four models one after another, vs ours, four in
                   one program.

Each measurement trains a fixed number of steps (`--teacher-steps`,
`--student-steps`) warm (compilation / tracing excluded and reported
separately); s/epoch is the median time per step times the steps of one
epoch of 48k images (187 teacher steps, 375 student steps). Keras' time per
step is measured by `on_train_batch_end` callbacks from the end of the first
batch to the end of the last, so its per-`fit`-call setup is left out (in its
favour); ours is the whole call divided by its steps. Measurements are interleaved round by
round with `os.getloadavg()` before/after each.

Writes experiments/results/bench_keras_<backend>.{md,json}.

  python -m experiments.bench_keras [--teacher-steps 20] [--student-steps 40] [--repeats 3]
"""
import argparse
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from experiments import bench_students as bs  # pylint: disable=g-import-not-at-top
from experiments import common  # pylint: disable=g-import-not-at-top
import tcn_jax
from tcn_jax import chunking
from tcn_jax import losses
from tcn_jax import models

try:
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
except ImportError:
  sys.exit("error: bench_keras.py needs TensorFlow: pip install '.[bench]' "
           '(tensorflow-cpu)')

TEACHER_BODY = common.paper_config(4)['teacher']['body']
STUDENT = common.paper_config(4)['students']['arch']
N = 4
TEACHER_BATCH, STUDENT_BATCH = 256, 128


# ----------------------------------------------------------------- Keras

def keras_layers(spec, init):
  """Keras layers for an architecture string (the subset these models use)."""
  out = []
  for layer in models.parse(spec):
    kind = layer['kind']
    if kind == 'conv':
      out.append(keras.layers.Conv2D(layer['features'], layer['kernel'],
                                     activation='relu', padding='valid',
                                     kernel_initializer=init))
    elif kind == 'pool':
      out.append(keras.layers.MaxPooling2D(2))
    elif kind == 'dropout':
      out.append(keras.layers.Dropout(layer['rate']))
    elif kind == 'flatten':
      out.append(keras.layers.Flatten())
    elif kind == 'dense':
      out.append(keras.layers.Dense(layer['features'], kernel_initializer=init,
                                    activation='relu' if layer['relu']
                                    else None))
    else:
      raise ValueError(f'no Keras layer for {layer}')
  return out


def keras_teacher(jit_compile='auto'):
  """The reference notebooks' Fashion-MNIST teacher: softmax output, one-hot
  labels, categorical cross-entropy, Adam('adam' = 1e-3)."""
  model = keras.Sequential(
      [keras.Input((28, 28, 1))] + keras_layers(TEACHER_BODY, 'glorot_uniform')
      + [keras.layers.Dropout(0.5),
         keras.layers.Dense(10, activation='softmax')])
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss='categorical_crossentropy', metrics=['accuracy'],
                jit_compile=jit_compile)
  return model


def keras_student(width, jit_compile='auto'):
  """The reference notebooks' F-MNIST FF student: init 'normal' (N(0, 0.05)),
  linear output Dense, MSE, Adam 1e-3."""
  model = keras.Sequential(
      [keras.Input((28, 28, 1))] + keras_layers(STUDENT, 'normal')
      + [keras.layers.Dense(width, kernel_initializer='normal')])
  model.compile(optimizer=keras.optimizers.Adam(1e-3), loss='mse',
                jit_compile=jit_compile)
  return model


class _StepTimes(keras.callbacks.Callback):

  def on_epoch_begin(self, epoch, logs=None):
    self.times = [time.perf_counter()]

  def on_train_batch_end(self, batch, logs=None):
    self.times.append(time.perf_counter())


class KerasRun:
  """A compiled Keras model trained `steps` batches per `run()` (one `fit`
  epoch over `steps * batch` images, reshuffled, drawn afresh each call)."""

  def __init__(self, model, x, y, steps, batch, seed):
    self.model, self.x, self.y = model, x, y
    self.steps, self.batch = steps, batch
    self.rng = np.random.default_rng(seed)
    self.callback = _StepTimes()
    self.step_s = []   # Per run: steady-state seconds per step.
    self.first_batch_s = []   # Per run: fit's start to the first batch end.

  def run(self):
    idx = np.sort(self.rng.choice(len(self.x), self.steps * self.batch,
                                  replace=False))
    self.model.fit(self.x[idx], self.y[idx], batch_size=self.batch, epochs=1,
                   shuffle=True, verbose=0, callbacks=[self.callback])
    # Steady state: from the end of the first batch (which carries fit's
    # setup: data adapter, iterator) to the end of the last.
    t = self.callback.times
    self.step_s.append((t[-1] - t[1]) / (len(t) - 2))
    self.first_batch_s.append(t[1] - t[0])

  def trace_seconds(self):
    """Tracing / graph building: the first run's first batch minus a
    steady-state step."""
    return max(self.first_batch_s[0] - float(np.median(self.step_s)), 0.0)


class KerasSequential:
  """n Keras students trained one after another."""

  def __init__(self, runs):
    self.runs = runs

  def run(self):
    for r in self.runs:
      r.run()

  def trace_seconds(self):
    return sum(r.trace_seconds() for r in self.runs)


# ------------------------------------------------------------------ main

def per_step(samples, steps):
  return bs.median_s(samples) / steps


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--teacher-steps', type=int, default=20)
  ap.add_argument('--student-steps', type=int, default=40)
  ap.add_argument('--repeats', type=int, default=3)
  args = ap.parse_args()
  ds = tcn_jax.load_dataset('fashion_mnist')
  x, y = ds.train.x, ds.train.y
  bs.log(f'data: {ds.source}, train {x.shape}; keras {keras.__version__}, '
         f'tensorflow {tf.__version__}, jax {jax.__version__}')
  width = chunking.chunk_sizes(256, N)[0]
  rng = np.random.default_rng(0)
  # Stand-in teacher features (post-ReLU like the real ones).
  targets = np.maximum(rng.standard_normal((N, len(x), width), np.float32), 0)
  ts, ss = args.teacher_steps, args.student_steps
  epoch_steps = {'teacher': len(x) // TEACHER_BATCH,
                 'student': len(x) // STUDENT_BATCH}

  x_dev, t_dev = jnp.asarray(x), jnp.asarray(targets)
  ours = {
      'ours_teacher': bs.Group(
          models.Teacher(TEACHER_BODY, 10, 0.5), losses.ce, [0], 'auto',
          x_dev, jnp.asarray(y)[None], ts, batch=TEACHER_BATCH),
      'ours_student': bs.student_group(STUDENT, width, [0], 'auto', x_dev,
                                       t_dev, ss),
      'ours_4_in_one': bs.student_group(STUDENT, width, range(N), 'auto',
                                        x_dev, t_dev, ss),
  }
  onehot = np.eye(10, dtype=np.float32)[y]
  keras_runs = {
      'keras_teacher': KerasRun(keras_teacher(), x, onehot, ts,
                                TEACHER_BATCH, 0),
      'keras_4_sequential': KerasSequential(
          [KerasRun(keras_student(width), x, targets[i], ss, STUDENT_BATCH,
                    i + 1) for i in range(N)]),
      # The same Keras models compiled with XLA (jit_compile=True), as a
      # reference for what XLA:CPU makes of them.
      # (Fewer teacher steps: XLA:CPU takes seconds per step there.)
      'keras_xla_teacher': KerasRun(keras_teacher(True), x, onehot,
                                    max(ts // 4, 3), TEACHER_BATCH, 10),
      'keras_xla_student': KerasRun(keras_student(width, True), x, targets[0],
                                    ss, STUDENT_BATCH, 11),
  }
  keras_jit = {'teacher': keras_runs['keras_teacher'].model.jit_compile,
               'student': keras_runs['keras_4_sequential'].runs[0]
               .model.jit_compile}
  first = {}
  variants = {**ours, **keras_runs}
  for k, v in variants.items():
    bs.log(f'{k}: compiling + first run')
    first[k] = bs.timed(v.run)['s']
  xla_runs = {k: keras_runs[k] for k in ('keras_xla_teacher',
                                         'keras_xla_student')}
  for r in [keras_runs['keras_teacher'], *keras_runs['keras_4_sequential'].runs,
            *xla_runs.values()]:
    r.step_s.clear()   # Keep the warm rounds only.
  order = ['keras_teacher', 'ours_teacher', 'keras_4_sequential',
           'ours_student', 'ours_4_in_one', 'keras_xla_teacher',
           'keras_xla_student']
  bs.log(f'{args.repeats} interleaved rounds')
  samples = bs.interleaved({k: variants[k].run for k in order}, args.repeats,
                           bs.log)
  # Compile: ours lowered and compiled ahead of time; Keras' tracing: the
  # first run's first batch minus a steady-state step.
  compile_s = {k: v.compile_seconds() for k, v in ours.items()}
  compile_s.update({k: v.trace_seconds() for k, v in keras_runs.items()})

  kt = keras_runs['keras_teacher']
  ks = keras_runs['keras_4_sequential'].runs
  step = {
      'keras_teacher': float(np.median(kt.step_s)),
      'ours_teacher': per_step(samples['ours_teacher'], ts),
      # One Keras student: every member's per-run median, all rounds.
      'keras_student': float(np.median([s for r in ks for s in r.step_s])),
      'ours_student': per_step(samples['ours_student'], ss),
      # Four Keras students one after another: the sum of the members.
      'keras_4_sequential': float(sum(np.median(r.step_s) for r in ks)),
      'ours_4_in_one': per_step(samples['ours_4_in_one'], ss),
      'keras_xla_teacher': float(np.median(xla_runs['keras_xla_teacher']
                                           .step_s)),
      'keras_xla_student': float(np.median(xla_runs['keras_xla_student']
                                           .step_s)),
  }
  wall_step = {'keras_teacher': per_step(samples['keras_teacher'], ts),
               'keras_4_sequential': per_step(samples['keras_4_sequential'],
                                              ss)}
  epoch = {k: v * epoch_steps['teacher' if 'teacher' in k else 'student']
           for k, v in step.items()}
  # Ratios: the median over rounds of ours / Keras measured in the same
  # round (paired, so a load burst during one round cancels out).
  ours_round = {k: [x['s'] / (ts if 'teacher' in k else ss)
                    for x in samples[k]] for k in ours}
  keras_round = {
      'teacher': kt.step_s,
      'student': [float(np.median([r.step_s[i] for r in ks]))
                  for i in range(args.repeats)],
      'sequential': [float(sum(r.step_s[i] for r in ks))
                     for i in range(args.repeats)]}
  paired = lambda a, b: float(np.median(np.asarray(a) / np.asarray(b)))
  ratios = {
      'teacher': paired(ours_round['ours_teacher'], keras_round['teacher']),
      'student': paired(ours_round['ours_student'], keras_round['student']),
      'ours_4_in_one_vs_keras_4_sequential':
          paired(ours_round['ours_4_in_one'], keras_round['sequential']),
      'ours_per_student_in_4_vs_keras_student':
          paired(ours_round['ours_4_in_one'], keras_round['student']) / N,
      'teacher_vs_keras_xla': step['ours_teacher'] / step['keras_xla_teacher'],
      'student_vs_keras_xla': step['ours_student'] / step['keras_xla_student'],
  }
  meta = bs.meta_info(
      command=bs.command(), keras=keras.__version__, tensorflow=tf.__version__,
      keras_jit_compile=keras_jit, teacher_steps=ts, student_steps=ss,
      repeats=args.repeats, epoch_steps=epoch_steps, data=ds.source,
      train_images=len(x), teacher=TEACHER_BODY, student=STUDENT,
      reference_keras={'student_ms_per_step': 111, 'student_s_per_epoch': 41.6,
                       'teacher_ms_per_step_batch256': 517})
  doc = {'meta': meta, 'ms_per_step': {k: 1000 * v for k, v in step.items()},
         'keras_wall_ms_per_step': {k: 1000 * v for k, v in wall_step.items()},
         's_per_epoch': epoch, 'ratios_ours_over_keras': ratios,
         'compile_s': compile_s, 'first_call_s': first, 'samples': samples,
         'keras_step_s': {'teacher': kt.step_s,
                          'students': [r.step_s for r in ks],
                          **{k: r.step_s for k, r in xla_runs.items()}}}

  def row(name, k_key, o_key, ratio, steps_kind):
    return (f'| {name} | {1000 * step[k_key]:.0f} | {epoch[k_key]:.1f} | '
            f'{1000 * step[o_key]:.0f} | {epoch[o_key]:.1f} | '
            f'{ratio:.2f}x | {epoch_steps[steps_kind]} |')

  lines = [
      '# Keras (the authors\' models) vs tcn_jax, Fashion-MNIST training '
      f'({meta["backend"]})', '', f'Command: `{meta["command"]}`', '',
      f'Device: {meta["device"]} ({meta["cpu_count"]} cores, shared); '
      f'TensorFlow {tf.__version__} / Keras {keras.__version__} (jit_compile '
      f'resolved to {keras_jit["teacher"]}, i.e. the default graph mode with '
      f'oneDNN); jax {jax.__version__}, layers `{meta["layers_impl"]}`, '
      f'strategy `auto` = {meta["auto_strategy"]}. Real training images '
      f'({len(x)}); student targets are stand-in features. Warm: '
      f'{ts} teacher steps (batch {TEACHER_BATCH}) and {ss} student steps '
      f'(batch {STUDENT_BATCH}) per measurement, median of {args.repeats} '
      'interleaved rounds (ratios: median over rounds of the ratio within '
      'a round), extrapolated to one epoch of '
      f'{len(x)} images. Keras per step = batch-end callbacks, end of the '
      'first batch to end of the last (fit\'s setup left out); ours = whole '
      'call / steps.', '',
      '| model | Keras ms/step | Keras s/epoch | ours ms/step | ours s/epoch '
      '| ours / Keras | steps/epoch |', '|---|---|---|---|---|---|---|',
      row('teacher', 'keras_teacher', 'ours_teacher', ratios['teacher'],
          'teacher'),
      row('one n=4 student', 'keras_student', 'ours_student',
          ratios['student'], 'student'),
      row('four n=4 students (Keras one after another; ours in one program)',
          'keras_4_sequential', 'ours_4_in_one',
          ratios['ours_4_in_one_vs_keras_4_sequential'], 'student'),
      row('teacher, Keras with XLA (`jit_compile=True`)',
          'keras_xla_teacher', 'ours_teacher',
          step['ours_teacher'] / step['keras_xla_teacher'], 'teacher'),
      row('one n=4 student, Keras with XLA (`jit_compile=True`)',
          'keras_xla_student', 'ours_student',
          step['ours_student'] / step['keras_xla_student'], 'student'),
      '', f'Per student inside our four-in-one program: '
      f'{1000 * step["ours_4_in_one"] / N:.0f} ms/step, '
      f'{ratios["ours_per_student_in_4_vs_keras_student"]:.2f}x Keras\' one '
      'student.', '',
      'Targets: ours <= 0.5x Keras for the teacher and per student. '
      'Reference Keras timings measured earlier on this kind of machine: '
      'student 111 ms/step (41.6 s/epoch), teacher 517 ms/step.', '',
      'Keras wall time per step including each `fit` call\'s setup: teacher '
      f'{1000 * wall_step["keras_teacher"]:.0f} ms, four students one after '
      f'another {1000 * wall_step["keras_4_sequential"]:.0f} ms.', '',
      '## Compile / trace time (s; ours: jitted epoch compiled ahead of time; Keras: first batch minus a steady step)', '',
      '| ' + ' | '.join(compile_s) + ' |', '|' + '---|' * len(compile_s),
      '| ' + ' | '.join(f'{v:.1f}' for v in compile_s.values()) + ' |']
  bs.write_results(os.path.join(bs.RESULTS,
                                f'bench_keras_{meta["backend"]}'), doc, lines)


if __name__ == '__main__':
  main()
