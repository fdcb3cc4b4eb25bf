"""Fashion-MNIST, paper setup (reference notebooks): n=4 FF students by default.

Fields whose value is '' or -1 take the paper's value for the chosen
num_students from the matching `*_by_n` table, so `--config.num_students=8`
switches architecture and schedules together. Presets after a colon:
`configs/fashion_mnist.py:smoke` is a seconds-long run on a small subset.
"""
import re

import ml_collections

# Student trunks per n (reference Sec. 3); the output Dense of the chunk's
# width is appended by the library.
STUDENTS_FMNIST = {
    '1': 'C32 C32 MP C16 C16 MP Do.25 F D64r Do.3',
    '2': 'C32 C32 MP C16 C16 MP Do.25 F D16r Do.3',
    '4': 'C32 C32 MP C16 C16 MP Do.25 F D16r Do.3',
    '8': 'C32 C32 MP C16 C16 MP Do.25 F D16r Do.3',
}
# Paper Table 4 (n=4, '|' = one architecture per student): s1 as above, s2-s4
# "improved by increasing model depth" to 85.74k parameters each. The paper
# gives no architecture; this one adds a conv layer and widens the Dense:
# 82,560 parameters with a 64-wide chunk.
IMPROVED_FMNIST_4 = ' | '.join(
    [STUDENTS_FMNIST['4']] + ['C32 C32 MP C32 C32 C32 MP Do.25 F D128r Do.3'] * 3)

# Not in the paper: n >= 2 students without the paper's 16-unit Dense
# bottleneck (which caps a student's output at rank 16 whatever its chunk
# width), at about the paper's parameters (the first convolutions narrowed
# to pay for it): n=2 25.7k, n=4 22.6k, n=8 21.0k per student.
WIDE_FMNIST = 'C16 C16 MP C16 C16 MP Do.25 F D48r Do.3'

# Not in the paper: n = 8 students small enough that all eight fit in 100k
# parameters (11.7k each, 93.6k in all; the paper's eight total 169k), with
# a 32-unit Dense as wide as the student's chunk.
SLIM_FMNIST_8 = 'C8 C8 MP C8 C16 MP Do.25 F D32r Do.3'


def with_batchnorm(spec: str) -> str:
  """`spec` with BatchNorm between each ReLU conv / dense layer and its ReLU
  ('C32' -> 'C32lin BN R', 'D64r' -> 'D64 BN R'); other tokens are kept."""
  def one(tok):
    if re.fullmatch(r'C(\d+-)?\d+(s\d+)?(same)?', tok):
      return f'{tok}lin BN R'
    return f'{tok[:-1]} BN R' if re.fullmatch(r'D\d+r', tok) else tok
  return ' '.join(one(t) for t in spec.split())


def get_config(preset: str = ''):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_students = 4
  c.method = 'ff'
  c.layers_impl = 'auto'          # 'auto' | 'im2col' | 'xla'.
  c.eval_batch_size = 1000
  c.allow_config_change = False
  # 'contiguous' (the paper) or 'pca': students regress chunks of principal-
  # component coefficients ('ordered' by variance, or variance-'balanced').
  c.chunking = 'contiguous'
  c.pca_assignment = 'balanced'

  c.data = ml_collections.ConfigDict(dict(
      name='fashion_mnist', dir='', split_seed=0, val_fraction=0.2,
      train_size=0, test_size=0))

  c.teacher = ml_collections.ConfigDict(dict(
      body='C32 C64 MP Do.25 F D256r D256r', head_dropout=0.5, head_bn=False,
      optimizer='adam', learning_rate=1e-3, weight_decay=0.0, batch_size=256,
      epochs=20, lr_step_epochs=0, lr_step_factor=0.5))

  c.students = ml_collections.ConfigDict(dict(
      arch='', arch_by_n=STUDENTS_FMNIST, init='normal', out_relu=False,
      optimizer='adam', learning_rate=1e-3, weight_decay=0.0, batch_size=128,
      epochs=10, strategy='auto',
      lr_schedule='constant',   # or 'cosine' (to 0 over the epochs).
      # Not in the paper (''): 'flip' adds the mirrored training images,
      # with the teacher's features of them, to the students' training set.
      augment='',
      # Not in the paper (off): + logit_weight * T^2 * KL between the
      # teacher's logits and its frozen head on the feature with this
      # student's chunk swapped in (train.logit_matching_loss).
      logit_weight=0.0, logit_temperature=2.0))

  c.head = ml_collections.ConfigDict(dict(
      dropout=-1.0, dropout_by_n={'1': 0.5, '2': 0.5, '4': 0.5, '8': 0.3},
      optimizer='', optimizer_by_n={'1': 'adam', '2': 'adam', '4': 'adam',
                                    '8': 'nadam'},
      learning_rate=1e-3, batch_size=128, keep_teacher_bn=False,
      epochs=-1, epochs_by_n={'1': 5, '2': 30, '4': 20, '8': 10}))

  # GAN students (config.method='gan'; the ':gan' preset also sets the
  # paper's GAN schedules). Discriminator widths per n (reference Sec. 4).
  c.gan = ml_collections.ConfigDict(dict(
      disc='', disc_by_n={'1': '64 128 256 512 1024', '2': '64 128 256 512 1024',
                          '4': '64 128 256 512', '8': '64 128 256 512 1024'},
      disc_first_bias=False, recon_relu=False, mse_target='student_output',
      adv_weight=1.0,
      mse_weight=1.0, g_steps_per_d_step=1, d_optimizer='adam',
      d_learning_rate=2e-4))

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

  # Students split over processes / hosts (docs/distributed.md): run the same
  # command once per process with its process_id; coordinator = host:port
  # of process 0. Teacher, features and head run on process 0.
  c.distributed = ml_collections.ConfigDict(dict(
      num_processes=1, process_id=0, coordinator=''))

  for p in filter(None, preset.split(',')):
    apply_preset(c, p)
  return c


def _fashion_mnist_only(c, preset):
  if c.data.name != 'fashion_mnist':
    raise ValueError(f"preset '{preset}' exists for fashion_mnist only")


def apply_preset(c, preset):
  """'smoke': a small real-data subset and short schedules (tests, demos).
  'gan': GAN students with the authors' Fashion-MNIST GAN schedules.
  'tuned' (not in the paper): FF students that also match the teacher's
  logits through its frozen head, with a cosine learning rate.
  'improved': n=4 with the paper's Table 4 non-identical students.
  'bn' (not in the paper): BatchNorm before every ReLU of the students
  (apply after 'improved' to change its students too).
  'wide' (not in the paper; Fashion-MNIST only): n >= 2 students with a
  48-unit instead of a 16-unit bottleneck, same budget (WIDE_FMNIST).
  'slim' (not in the paper; Fashion-MNIST only): n = 8 students of 11.7k
  parameters (SLIM_FMNIST_8) instead of 21.2k; other n are kept.
  'flip' (not in the paper): students also regress the teacher's features
  of the left-right mirrored training images (twice the steps per epoch)."""
  if preset == 'gan':
    c.method = 'gan'
    c.students.epochs, c.students.learning_rate = 55, 2e-4
    c.head.epochs_by_n = {'1': 50, '2': 30, '4': 30, '8': 100}
    return
  if preset == 'tuned':
    c.students.logit_weight, c.students.lr_schedule = 1.0, 'cosine'
    return
  if preset == 'bn':
    c.students.arch_by_n = {k: with_batchnorm(v)
                            for k, v in c.students.arch_by_n.items()}
    if c.students.arch:
      c.students.arch = with_batchnorm(c.students.arch)
    return
  if preset == 'flip':
    c.students.augment = 'flip'
    return
  if preset == 'wide':
    _fashion_mnist_only(c, 'wide')
    c.students.arch_by_n = dict(c.students.arch_by_n, **{
        k: WIDE_FMNIST for k in ('2', '4', '8')})
    return
  if preset == 'slim':
    _fashion_mnist_only(c, 'slim')
    c.students.arch_by_n = dict(c.students.arch_by_n, **{'8': SLIM_FMNIST_8})
    return
  if preset == 'improved':
    _fashion_mnist_only(c, 'improved')
    c.num_students, c.students.arch = 4, IMPROVED_FMNIST_4
    return
  if preset != 'smoke':
    raise ValueError(f'unknown preset {preset!r}; known: smoke, gan, tuned, '
                     'improved, bn, wide, slim, flip')
  c.data.train_size, c.data.test_size = 3000, 1000
  c.teacher.epochs, c.teacher.batch_size = 3, 100
  c.students.epochs, c.students.batch_size = 4, 100
  c.head.epochs, c.head.batch_size = 3, 100
  c.kd.epochs, c.kd.batch_size = 3, 100
  c.kdgan.epochs = 3
