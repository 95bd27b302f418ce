"""Mesh construction, batch layout and the per-device loss mapping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import sharding


def test_mesh_from_config_takes_the_remaining_devices():
  mesh = sharding.make_mesh([("data", -1)])
  assert mesh.shape == {"data": 8}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  two_axes = sharding.make_mesh([("data", -1), ("model", 2)])
  assert two_axes.shape == {"data": 4, "model": 2}


@pytest.mark.parametrize("axes,message", [
    ([("data", 3)], "needs 3 devices"),
    ([("data", -1), ("model", -1)], "At most one"),
    ([("batch", -1)], "'data' axis"),
    ([("data", -1), ("model", 3)], "does not divide"),
])
def test_bad_mesh_configs_fail_clearly(axes, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(axes)


def test_indivisible_batch_names_all_sizes():
  mesh = sharding.make_mesh()
  sharding.check_batch_divisible(64, mesh)
  with pytest.raises(ValueError, match=r"per host 60, per device 7\.5"):
    sharding.check_batch_divisible(60, mesh)


def test_global_batch_is_sharded_on_its_leading_axis():
  mesh = sharding.make_mesh()
  local = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           "label": np.arange(16, dtype=np.int32)}
  batch = sharding.make_global_batch(mesh, local)
  assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  assert len(batch["image"].addressable_shards) == 8
  assert batch["image"].addressable_shards[1].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])


def test_map_batch_shards_sees_local_rows_under_a_mesh():
  def kernel(x, axis_name):
    rows = jnp.asarray(x.shape[0], jnp.float32)
    if axis_name is None:
      return rows
    return jax.lax.pmax(rows, axis_name)

  x = jnp.zeros((16, 2))
  assert float(sharding.map_batch_shards(kernel, x)) == 16
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    sharded = jax.device_put(x, sharding.batch_sharding(mesh))
    assert float(jax.jit(lambda x: sharding.map_batch_shards(kernel, x))(
        sharded)) == 2
  with jax.set_mesh(sharding.local_mesh()):
    assert sharding.batch_axis_size() == 1
