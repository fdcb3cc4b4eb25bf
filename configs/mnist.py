"""MNIST, paper setup (reference notebooks): n=4 FF students by default."""
from tcn_jax import config as config_lib
from tcn_jax import presets

# MNIST FF student trunks per n (reference Sec. 3).
STUDENTS_MNIST = {
    '1': 'C64 C64 MP C32 C32 MP Do.25 F D16r Do.3',
    '2': 'C16 C16 MP C16 C16 MP Do.25 F Do.3',
    '4': 'C32 C32 MP C16 C16 MP Do.25 F D8r Do.3',
    '8': 'C16 C16 MP C16 C16 MP Do.25 F D12r Do.3',
}

# MNIST GAN generators per n (reference Sec. 3; they differ from FF).
GAN_STUDENTS_MNIST = {
    '1': 'C64 C64 MP C16 C16 MP Do.25 F D32r Do.3',
    '2': 'C5-32 C5-32 MP C16 C16 MP Do.25 F D32r Do.3',
    '4': 'C16 C16 MP C16 C16 MP Do.25 F D32r Do.3',
    '8': 'C16 C16 MP C16 C16 MP F D8r Do.2',
}


def get_config(preset: str = ''):
  c = config_lib.base_config()
  c.data.name = 'mnist'
  c.teacher.epochs = 12
  c.students.arch_by_n = STUDENTS_MNIST
  c.students.epochs = -1
  c.students.epochs_by_n = {'1': 20, '2': 10, '4': 10, '8': 20}
  c.head.dropout_by_n = {'1': 0.5, '2': 0.5, '4': 0.5, '8': 0.5}
  c.head.optimizer_by_n = {'1': 'adam', '2': 'adam', '4': 'adam', '8': 'adam'}
  c.head.epochs_by_n = {'1': 20, '2': 10, '4': 5, '8': 10}
  c.kd.arch_by_n = {   # About the total parameters of the MNIST FF students.
      '1': 'C32 C32 MP C16 C16 MP Do.25 F D230r Do.3',   # 77,932 params
      '2': 'C32 C32 MP C16 C16 MP Do.25 F D238r Do.3',   # 80,068
      '4': 'C32 C32 MP C16 C16 MP Do.25 F D225r Do.3',   # 76,597
      '8': 'C32 C32 MP C16 C16 MP Do.25 F D256r Do.3'}   # 84,874
  c.gan.disc_by_n = {k: '64 128 256 512 1024' for k in ('1', '2', '4', '8')}
  c.gan.disc_first_bias = True
  return presets.apply(c, preset, extra={'gan': _gan})


def _gan(c):
  """The authors' MNIST GAN students and schedules."""
  c.students.arch_by_n = GAN_STUDENTS_MNIST
  c.gan.g_steps_per_d_step = -1
  c.gan.g_steps_per_d_step_by_n = {'1': 1, '2': 2, '4': 1, '8': 1}
  c.students.epochs = 40
  c.head.epochs_by_n = {'1': 20, '2': 20, '4': 70, '8': 100}
