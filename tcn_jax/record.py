"""The typed records the pipeline's stages pass to each other.

`Run` is what every stage reads (resolved config, workdir, data); each stage
returns its own record, which carries its `key`: a digest of what the stage
was computed from (see `workdir.stage_key`), so a consumer's key can name it.
"""
import dataclasses
from typing import Any

import ml_collections

from tcn_jax import assemble
from tcn_jax import chunking
from tcn_jax import data as data_lib


@dataclasses.dataclass(frozen=True)
class Run:
  """One run: the resolved config, where it writes, and its data.

  Attributes:
    config: the resolved config (`tcn_jax.config.resolve`).
    workdir: the run's directory ('' for a run that saves nothing).
    ds: the loaded dataset.
    data_key: a digest of the dataset's arrays.
    writer: TensorBoard writer, or None.
  """
  config: ml_collections.ConfigDict
  workdir: str
  ds: data_lib.Dataset
  data_key: str
  writer: Any = None


@dataclasses.dataclass(frozen=True)
class Teacher:
  model: Any          # models.Teacher
  variables: Any      # {'params', ['batch_stats']}
  test_acc: float
  seconds: float      # Training seconds (0 for a loaded teacher).
  key: str


@dataclasses.dataclass(frozen=True)
class Features:
  """The teacher's (raw) features of the students' training inputs."""
  train: Any          # (N, D)
  val: Any
  train_flip: Any     # Of the mirrored images (students.augment='flip').
  key: str
  # 'cached' (train holds them) or 'online' (train is None: the students'
  # step computes them from each batch; students.features).
  mode: str = 'cached'


@dataclasses.dataclass(frozen=True)
class Students:
  groups: list[assemble.StudentGroup]
  chunker: chunking.Chunker
  info: dict          # 'val_mse' per student, 'seconds', distributed info.
  key: str


@dataclasses.dataclass(frozen=True)
class Head:
  tcn: assemble.TCN   # With the fine-tuned head.
  info: dict          # 'test_acc_before', 'test_acc_after', 'seconds'.
  key: str
