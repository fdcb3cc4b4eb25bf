"""IMDB reviews, paper setup (reference notebooks): n=4 FF students.

Vocabulary of the 1,000 most frequent training words, reviews pre-padded /
pre-truncated to 500 tokens (as Keras imdb.load_data + pad_sequences). The
Conv1D teacher's feature is its post-ReLU Dense-256, so ReLU student outputs
are harmless and kept. The binary sigmoid output is a 2-way softmax here (the
same family of classifiers). Presets: ':smoke', ':gan'.
"""
from tcn_jax import config as config_lib
from tcn_jax import presets

_EMB = 'Emb1000-10 Do.2'
STUDENTS = {
    '1': f'{_EMB} C128s2 MP C64s2 MP F Do.4 D64r Do.2',   # 178,192 params
    '2': f'{_EMB} C128s3 MP C64s3 MP F Do.4 D64r Do.2',   # 100,240
    '4': f'{_EMB} C128s3 MP C32s3 MP F Do.4 D32r Do.2',   # 41,744
    '8': f'{_EMB} C32s3 MP C32s3 MP F Do.4 D16r Do.2',    # 21,312
}
_KD = f'{_EMB} C128s2 MP C64s2 MP F Do.4'


def get_config(preset: str = ''):
  c = config_lib.base_config()
  c.data.name = 'imdb'
  c.data.vocab_size, c.data.max_len = 1000, 500
  t = c.teacher
  t.body, t.head_dropout = 'Emb1000-32 C64same C64same MP F D256r', 0.0
  t.batch_size, t.epochs = 128, 10
  s = c.students
  s.arch_by_n, s.init, s.out_relu = STUDENTS, 'glorot_uniform', True
  s.epochs = 10
  h = c.head
  h.dropout_by_n = {k: 0.5 for k in ('1', '2', '4', '8')}
  h.optimizer_by_n = {k: 'adam' for k in ('1', '2', '4', '8')}
  h.epochs_by_n = {k: 10 for k in ('1', '2', '4', '8')}
  c.gan.disc_by_n = {'1': '128 256 256 512', '2': '64 128 256 512',
                     '4': '128 256 256 512', '8': '128 128 256 256'}
  c.gan.disc_first_bias, c.gan.recon_relu = True, True
  c.gan.adv_weight = c.gan.mse_weight = 0.5
  c.kd.arch_by_n = {   # About the total parameters of the n students.
      '1': f'{_KD} D73r Do.2', '2': f'{_KD} D84r Do.2',
      '4': f'{_KD} D67r Do.2', '8': f'{_KD} D69r Do.2'}
  return presets.apply(c, preset, extra={'gan': _gan, 'smoke': _smoke})


def _gan(c):
  """The authors' IMDB GAN schedules."""
  c.students.epochs, c.students.learning_rate = 20, 1e-3
  c.head.epochs_by_n = {k: 10 for k in ('1', '2', '4', '8')}


def _smoke(c):
  """Short reviews, small nets of the same kinds."""
  t, s, h = c.teacher, c.students, c.head
  c.data.max_len = 100
  t.body = 'Emb1000-8 C16same MP F D32r'
  small = 'Emb1000-4 Do.2 C8s3 MP F Do.4 D8r Do.2'
  s.arch_by_n = c.kd.arch_by_n = {k: small for k in STUDENTS}
  c.gan.disc_by_n = {k: '16 16 32' for k in STUDENTS}
  t.batch_size = s.batch_size = h.batch_size = c.kd.batch_size = 50
