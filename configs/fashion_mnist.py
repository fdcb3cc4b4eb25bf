"""Fashion-MNIST, paper setup (reference notebooks): n=4 FF students.

Fields whose value is '' or -1 take the paper's value for the chosen
num_students from the matching `*_by_n` table, so `--config.num_students=8`
switches architecture and schedules together (`tcn_jax.config.resolve`).
Presets after a colon (`tcn_jax.presets`): `configs/fashion_mnist.py:smoke`
is a minutes-long run on a small subset, `:best` the best-known recipe.
"""
from tcn_jax import config as config_lib
from tcn_jax import presets


def get_config(preset: str = ''):
  return presets.apply(config_lib.base_config(), preset)
