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
from tcn_jax import layers
from tcn_jax import models
from tcn_jax.errors import TCNError


@dataclasses.dataclass
class StudentGroup:
  """Identical students (same architecture and output width), stacked."""
  spec: str
  out_dim: int
  member_ids: list[int]   # Which chunks, in feature order, these students own.
  out_relu: bool = False
  init: str = 'normal'
  variables: Any = None   # {'params', ['batch_stats']}; leading axis = member.

  def model(self, impl='auto', dtype=None):
    return models.student(self.spec, self.out_dim, self.out_relu, self.init,
                          impl, dtype)

  def describe(self):
    return {k: v for k, v in dataclasses.asdict(self).items()
            if k != 'variables'}


@dataclasses.dataclass
class TCN:
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
  def chunker(self) -> chunking.Chunker:
    """How the students' concatenated outputs map to the feature."""
    return chunking.Chunker(
        self.num_students, sum(g.out_dim * len(g.member_ids)
                               for g in self.groups), self.basis)


def teacher_head(teacher_variables, keep_bn: bool = False):
  """The teacher's output layer as TCN head variables; its BatchNorm (if
  any) only with keep_bn (the authors' CIFAR-10 TCN head drops it)."""
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
  """Jitted `predict(images) -> logits` of the assembled network.

  Args:
    tcn: the assembled network.
    strategy: how the students of a group run (`engine.STRATEGIES`).
    impl: the convolution path; None: `layers.forward_impl(tcn.impl)`, XLA's
      own convolution unless the TCN asks for 'im2col' (forward-only, it is
      the faster one on the CPU too).
  """
  tcn = dataclasses.replace(tcn, impl=impl or layers.forward_impl(tcn.impl))
  outputs = student_outputs_fn(tcn, strategy)
  head = tcn_head(tcn)
  students = [g.variables for g in tcn.groups]
  head_variables = tcn.head_variables
  return jax.jit(lambda x: head.apply(head_variables, outputs(students, x)))


def tcn_head(tcn: TCN) -> models.Head:
  """The head module matching `tcn.head_variables` (BatchNorm if kept)."""
  return models.Head(tcn.num_classes, tcn.head_dropout, bn=tcn.head_bn)


def save_tcn(path: str, tcn: TCN):
  """Saves the TCN (all students, head, architecture) as one checkpoint."""
  state = {'students': {str(i): g.variables
                        for i, g in enumerate(tcn.groups)},
           'head': tcn.head_variables}
  if tcn.basis is not None:
    state['basis'] = tcn.basis
  meta = {'kind': 'tcn_jax.TCN', 'groups': [g.describe() for g in tcn.groups],
          'num_classes': tcn.num_classes, 'head_dropout': tcn.head_dropout,
          'head_bn': tcn.head_bn, 'pca_basis': tcn.basis is not None}
  with checkpoint.StageCheckpoint(path, max_to_keep=1) as ckpt:
    ckpt.save(ckpt.latest_epoch() + 1, state, meta)   # Replaces an older TCN.


def load_tcn(path: str, strategy='auto'):
  """Loads a saved TCN; returns (jitted predict(images) -> logits, TCN)."""
  if not os.path.isdir(path):
    raise TCNError(f'load_tcn: {path} is not a directory')
  with checkpoint.StageCheckpoint(path, read_only=True) as ckpt:
    if not ckpt.latest_epoch():
      raise TCNError(f'load_tcn: {path} holds no TCN checkpoint')
    state, meta = ckpt.restore()
  if not isinstance(meta, dict) or meta.get('kind') != 'tcn_jax.TCN':
    raise TCNError(f'load_tcn: {path} is a checkpoint but not of a TCN')
  groups = [StudentGroup(**g) for g in meta['groups']]
  tcn = TCN(groups, meta['num_classes'], meta['head_dropout'],
            head_bn=meta.get('head_bn', False))
  for i, g in enumerate(groups):
    g.variables = state['students'][str(i)]
  tcn.head_variables = state['head']
  tcn.basis = state.get('basis') if meta.get('pca_basis') else None
  return make_predict(tcn, strategy), tcn
