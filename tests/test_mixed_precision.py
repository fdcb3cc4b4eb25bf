"""Mixed precision (config.dtype): layers compute in bfloat16, parameters,
gradients and optimizer state stay float32, outputs are float32."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tcn_jax as tcn
from helpers import needs_fmnist
from helpers import tiny_config
from tcn_jax import config as config_lib
from tcn_jax import layers
from tcn_jax import models
from tcn_jax import workdir as workdir_lib
from tcn_jax.errors import TCNError


def _dtypes(tree):
  return {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(tree)}


def _operand_dtypes(jaxpr, primitives):
  """dtypes of the operands of `primitives` anywhere in a jaxpr."""
  out = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in primitives:
      out |= {str(v.aval.dtype) for v in eqn.invars}
    for sub in jax.core.jaxprs_in_params(eqn.params):
      out |= _operand_dtypes(sub, primitives)
  return out


@pytest.mark.parametrize('impl', ['im2col', 'xla'])
def test_bfloat16_computes_in_bfloat16_with_float32_state(impl):
  spec = 'C4 BN R MP C4same F D8r D3'
  x = jax.random.normal(jax.random.key(0), (16, 10, 10, 1))
  net32 = models.Net(spec, impl=impl)
  net16 = models.Net(spec, impl=impl, dtype=jnp.bfloat16)
  variables = jax.jit(net32.init)(jax.random.key(1), x)
  # The same float32 parameters either way: checkpoints are interchangeable.
  init16 = jax.jit(net16.init)(jax.random.key(1), x)
  assert _dtypes(init16) == {'float32'}
  jax.tree_util.tree_map(np.testing.assert_array_equal, init16, variables)
  out32, out16 = (jax.jit(n.apply)(variables, x) for n in (net32, net16))
  assert out16.dtype == jnp.float32
  assert not np.array_equal(out16, out32)   # Computed in another precision,
  np.testing.assert_allclose(out16, out32, atol=0.05 * np.abs(out32).max())
  ops = {'dot_general', 'conv_general_dilated'}
  for net, dtype in ((net16, 'bfloat16'), (net32, 'float32')):
    jaxpr = jax.make_jaxpr(lambda v, net=net: net.apply(v, x))(variables)
    assert _operand_dtypes(jaxpr.jaxpr, ops) == {dtype}
  if impl == 'xla':   # Gradients: on the training path of the CPU.
    return

  def grads(net, params):
    def loss(p):
      out, _ = net.apply({**variables, 'params': p}, x, train=True,
                         mutable=['batch_stats'])
      return jnp.mean(out ** 2)
    return jax.grad(loss)(params)

  g16, g32 = (jax.jit(grads, static_argnums=0)(n, variables['params'])
              for n in (net16, net32))
  tx = optax.adam(1e-3)
  opt_state = tx.init(variables['params'])
  updates, opt_state = jax.jit(tx.update)(g16, opt_state,
                                          variables['params'])
  assert _dtypes(g16) == _dtypes(updates) == {'float32'}
  assert _dtypes(opt_state) == {'float32', 'int32'}   # int32: Adam's count.
  # bfloat16 gradients point the same way as float32 ones.
  a, b = (np.concatenate([np.ravel(l) for l in jax.tree_util.tree_leaves(g)])
          for g in (g16, g32))
  assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99


@needs_fmnist
def test_bfloat16_teacher_trains_with_float32_parameters():
  ds = tcn.load_dataset('fashion_mnist', train_size=400, test_size=100)
  teacher = tcn.Teacher('C8 MP F D32r', 10, dtype=jnp.bfloat16)
  variables, info = tcn.train_teacher(teacher, ds, epochs=2, batch_size=64)
  assert _dtypes(variables) == {'float32'}
  losses = [h['train_loss'] for h in info['history']]
  assert losses[-1] < losses[0]
  logits = teacher.apply(variables, ds.test.x)
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()


def test_dtype_and_forward_impl_config_and_old_workdirs():
  assert tcn.resolve_config(tiny_config()).dtype == 'float32'
  assert tcn.resolve_config(tiny_config(dtype='bfloat16')).dtype == 'bfloat16'
  with pytest.raises(TCNError, match=r"compute dtype 'float16' \(config"
                     r"\.dtype\)"):
    tcn.resolve_config(tiny_config(dtype='float16'))
  with pytest.raises(TCNError, match=r"'fast' \(config\.forward_impl\)"):
    tcn.resolve_config(tiny_config(forward_impl='fast'))
  # A workdir made before the fields ran in float32, forward work on the
  # training path (its config.json read through config.upgrade): not a
  # change of config.
  new = config_lib.to_json(tcn.resolve_config(tiny_config()))
  old = config_lib.upgrade({k: v for k, v in new.items()
                            if k not in ('dtype', 'forward_impl')})
  assert workdir_lib.diff(old, new) == []
  assert workdir_lib.diff(old, {**new, 'dtype': 'bfloat16'})
  assert workdir_lib.diff(old, {**new, 'forward_impl': 'xla'})
  assert layers.stage_impl('im2col', '') == 'im2col'
  assert layers.stage_impl('im2col', 'auto') == 'xla'
  assert layers.forward_impl('auto') == 'xla'
  assert layers.forward_impl('im2col') == 'im2col'
