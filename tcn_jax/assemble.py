"""The assembled Teacher-Class Network: students -> concat -> teacher head.

`TCN` is a plain description (architectures as data plus Flax variables) that
`predict` runs without the teacher, and that `save_tcn` / `load_tcn` store as
one Orbax checkpoint (parameters + a JSON description of the architecture).
"""
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tcn_jax import checkpoint
from tcn_jax import chunking
from tcn_jax import engine
from tcn_jax import inputs
from tcn_jax import layers
from tcn_jax import models
from tcn_jax.errors import TCNError


@dataclasses.dataclass
class StudentGroup:
  """Identical students (same architecture and output width), stacked.

  Attributes:
    spec: the students' trunk architecture string (`tcn_jax.models`).
    out_dim: the width of each student's chunk (its output Dense).
    member_ids: the chunks these students own, in feature order.
    out_relu: a ReLU after the output Dense.
    init: the kernel initializer's name (`models.INITS`).
    variables: {'params', ['batch_stats']} with a leading member axis.
  """
  spec: str
  out_dim: int
  member_ids: list[int]   # Which chunks, in feature order, these students own.
  out_relu: bool = False
  init: str = 'normal'
  variables: Any = None   # {'params', ['batch_stats']}; leading axis = member.
  input_shape: Any = None  # One example's shape (train_students sets it).

  def __post_init__(self):   # From JSON or msgpack: a list.
    if self.input_shape is not None:
      self.input_shape = tuple(int(v) for v in self.input_shape)

  def model(self, impl='auto', dtype=None):
    return models.student(self.spec, self.out_dim, self.out_relu, self.init,
                          impl, dtype)

  def describe(self):
    """JSON data (msgpack too: lists, not tuples) of all but the variables."""
    out = {k: v for k, v in dataclasses.asdict(self).items()
           if k != 'variables'}
    if self.input_shape is not None:
      out['input_shape'] = list(self.input_shape)
    return out


@dataclasses.dataclass
class TCN:
  """The assembled network: students, their joined outputs, the head.

  Attributes:
    groups: the trained `StudentGroup`s (from `train_students`).
    num_classes: the head's outputs.
    head_dropout: the head's dropout rate while it is fine-tuned.
    head_variables: the head's {'params', ['batch_stats']}, usually the
      teacher's output layer (`teacher_head`) to start from.
    impl: the layers' implementation ('auto', 'im2col', 'xla').
    basis: None, or for PCA chunks {'matrix': (D, D), 'mean': (D,)}.
    head_bn: keep the teacher's BatchNorm in the head.
  """
  groups: list[StudentGroup]
  num_classes: int
  head_dropout: float
  head_variables: Any = None   # The head's {'params', ['batch_stats']}.
  impl: str = 'auto'
  # PCA chunking: {'matrix': (D, D), 'mean': (D,)}, a fixed linear map from
  # the concatenated students' coefficients back to feature space.
  basis: Any = None
  head_bn: bool = False        # Keep the teacher's BatchNorm in the head.

  @property
  def num_students(self):
    return sum(len(g.member_ids) for g in self.groups)

  @property
  def input_shape(self) -> tuple | None:
    """One example's shape, when its students recorded it (None: a TCN
    saved before they did; inputs are then checked against the
    parameters)."""
    shapes = [g.input_shape for g in self.groups if g.input_shape is not None]
    return tuple(shapes[0]) if shapes else None

  @property
  def chunker(self) -> chunking.Chunker:
    """How the students' concatenated outputs map to the feature."""
    return chunking.Chunker(
        self.num_students, sum(g.out_dim * len(g.member_ids)
                               for g in self.groups), self.basis)


def teacher_head(teacher_variables, keep_bn: bool = False):
  """The teacher's output layer as TCN head variables.

  Args:
    teacher_variables: the trained teacher's Flax variables.
    keep_bn: keep the head's BatchNorm, if any (the authors' CIFAR-10 TCN
      head drops it).

  Returns:
    The head's variables {'params', ['batch_stats']}, for `TCN`.
  """
  head = models.submodule_variables(teacher_variables, 'head')
  if keep_bn:
    return head
  return {'params': {k: v for k, v in head['params'].items()
                     if not k.startswith('BatchNorm')}}


def group_students(specs, out_dims, out_relu=False, init='normal'):
  """Groups students with identical (architecture, width), keeping order."""
  groups = {}
  for i, (spec, dim) in enumerate(zip(specs, out_dims)):
    groups.setdefault((spec, dim), []).append(i)
  return [StudentGroup(spec, dim, ids, out_relu, init)
          for (spec, dim), ids in groups.items()]


def student_outputs_fn(tcn: TCN, strategy='auto'):
  """Jitted `(students_variables, x) -> (batch, D)`: the students' outputs in
  chunk order, mapped back to feature space when chunks are PCA ones."""
  appliers = []
  for g in tcn.groups:
    model = g.model(tcn.impl)
    fn = lambda v, x, model=model: model.apply(v, x)
    appliers.append(engine.make_apply_fn(fn, len(g.member_ids), strategy))
  order = np.argsort([i for g in tcn.groups for i in g.member_ids])
  chunker = tcn.chunker

  def outputs(group_variables, x):
    parts = []
    for apply, variables in zip(appliers, group_variables):
      parts.extend(list(apply(variables, x)))     # One (batch, d) per member.
    return chunker.decode(jnp.concatenate([parts[i] for i in order], axis=-1))

  return jax.jit(outputs)


def make_predict(tcn: TCN, strategy='auto', impl: str | None = None):
  """The assembled network as one jitted function, without the teacher.

  `images` follow the API's input contract (`tcn_jax.inputs`): (N, ...)
  channels last, of the TCN's input shape, float in [0, 1] or uint8 pixels
  (scaled by 1/255 as the data loader does); anything else is a TCNError.

  Args:
    tcn: a `TCN` with trained students and head.
    strategy: how the members of a group run (`engine.STRATEGIES`).
    impl: the convolution path; None: `layers.forward_impl(tcn.impl)`, XLA's
      own convolution unless the TCN asks for 'im2col' (forward-only, it is
      the faster one on the CPU too).

  Returns:
    `predict(images) -> logits` (jitted, inference mode).
  """
  tcn = dataclasses.replace(tcn, impl=impl or layers.forward_impl(tcn.impl))
  outputs = student_outputs_fn(tcn, strategy)
  head = tcn_head(tcn)
  students = [g.variables for g in tcn.groups]
  head_variables = tcn.head_variables
  logits = jax.jit(lambda x: head.apply(head_variables, outputs(students, x)))
  spec, shape, fitting = tcn.groups[0].spec, tcn.input_shape, {}

  def predict(images):
    images = inputs.batch('predict', 'images', images, spec=spec, shape=shape)
    if shape is None:
      inputs.fits('predict', 'images', images, logits, fitting)
    return logits(images)

  return predict


def tcn_head(tcn: TCN) -> models.Head:
  """The head module matching `tcn.head_variables` (BatchNorm if kept)."""
  return models.Head(tcn.num_classes, tcn.head_dropout, bn=tcn.head_bn)


def save_tcn(path: str, tcn: TCN, classes=None):
  """Saves the TCN (all students, head, architecture) as one checkpoint.

  Args:
    path: a directory (an Orbax checkpoint); an older TCN there is replaced.
    tcn: the `TCN` to save.
    classes: optional names of the classes 0, 1, ... (`load_tcn(...,
      with_classes=True)` returns them).
  """
  state = {'students': {str(i): g.variables
                        for i, g in enumerate(tcn.groups)},
           'head': tcn.head_variables}
  if tcn.basis is not None:
    state['basis'] = tcn.basis
  meta = {'kind': 'tcn_jax.TCN', 'groups': [g.describe() for g in tcn.groups],
          'num_classes': tcn.num_classes, 'head_dropout': tcn.head_dropout,
          'head_bn': tcn.head_bn, 'pca_basis': tcn.basis is not None}
  if classes:
    meta['classes'] = [str(c) for c in classes]
  with checkpoint.StageCheckpoint(path, max_to_keep=1) as ckpt:
    ckpt.save(ckpt.latest_epoch() + 1, state, meta)   # Replaces an older TCN.


def load_tcn(path: str, strategy='auto', with_classes: bool = False):
  """Loads a TCN saved by `save_tcn` (or a run's `workdir/tcn`).

  Args:
    path: the directory `save_tcn` wrote.
    strategy: how the members of a group run (`engine.STRATEGIES`).
    with_classes: also return the class names saved with it.

  Returns:
    (predict, tcn): jitted `predict(images) -> logits` and the `TCN`; with
    with_classes (predict, tcn, names): names[i] is class i's name (None
    when none were saved).
  """
  if not os.path.isdir(path):
    raise TCNError(f'load_tcn: {path} is not a directory')
  with checkpoint.StageCheckpoint(path, read_only=True) as ckpt:
    if not ckpt.latest_epoch():
      raise TCNError(f'load_tcn: {path} holds no TCN checkpoint')
    state, meta = ckpt.restore()
  if not isinstance(meta, dict) or meta.get('kind') != 'tcn_jax.TCN':
    raise TCNError(f'load_tcn: {path} is a checkpoint but not of a TCN')
  groups = [StudentGroup(**g) for g in meta['groups']]   # input_shape: a list
  tcn = TCN(groups, meta['num_classes'], meta['head_dropout'],
            head_bn=meta.get('head_bn', False))
  for i, g in enumerate(groups):
    g.variables = state['students'][str(i)]
  tcn.head_variables = state['head']
  tcn.basis = state.get('basis') if meta.get('pca_basis') else None
  if with_classes:
    return make_predict(tcn, strategy), tcn, meta.get('classes')
  return make_predict(tcn, strategy), tcn
