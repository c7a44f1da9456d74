"""Two-micro-batch overlap (arXiv 2412.19437 §3.4): every block runs the two halves of the
batch separately, so one half's attention does not wait for the other half's expert
dispatch/combine. Same results as one batch; the independence read from the compiled HLO."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs.dsv3 import get_config
from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib
from dsv3_jax.inference.generate import Generator, SamplingConfig
from dsv3_jax.parallel import mesh as mesh_lib
from dsv3_jax.parallel import sharding
from tests import hlo

EP = 4


@pytest.fixture(scope="module")
def setup():
  cfg = config_lib.from_dict(get_config("tiny"))
  model = model_lib.create(cfg.model, seed=3)
  run = config_lib.replace(cfg, parallel={"data": 1, "expert": EP})
  plan = sharding.plan(run, mesh_lib.make_mesh(run.parallel, jax.devices()[:EP]))
  tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, cfg.model.vocab_size)
  return model, plan, tokens


def test_two_halves_equal_one_batch_on_one_device(setup):
  model, _, tokens = setup
  cache = model.init_cache(8, 24, jax.numpy.float32)
  one = model.forward(tokens, cache=cache)
  two = model.forward(tokens, cache=cache, microbatches=2, batch_shards=2)
  np.testing.assert_allclose(two.logits_BxLxV, one.logits_BxLxV, atol=1e-5)
  np.testing.assert_array_equal(two.load_LxE, one.load_LxE)
  np.testing.assert_allclose(two.balance_loss, one.balance_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(two.cache), jax.tree.leaves(one.cache)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # A decode step (absorbed MLA over the cache) split the same way.
  pos = jax.numpy.full((8, 1), 16, jax.numpy.int32)
  step = dict(positions_BxL=pos, cache=one.cache, absorb=True)
  np.testing.assert_allclose(
    model.forward(tokens[:, :1], microbatches=2, **step).logits_BxLxV,
    model.forward(tokens[:, :1], **step).logits_BxLxV,
    atol=1e-5,
  )
  with pytest.raises(ValueError, match=r"batch \(8\) must be a multiple of 16"):
    model.forward(tokens, microbatches=2, batch_shards=8)
  with pytest.raises(ValueError, match="microbatches must be 1 or 2"):
    model.forward(tokens, microbatches=3)


def _independent_pairs(lines: list) -> tuple[int, int, int]:
  """(all-to-alls, attention GEMM ops, pairs of the two with no path between them)."""
  g = hlo.Graph(lines)
  a2a, attn = g.all_to_alls(), g.gemms("/attention/")
  return len(a2a), len(attn), sum(g.independent(a, m) for a in a2a for m in attn)


def test_expert_parallel_halves_equal_and_independent_in_hlo(setup):
  model, plan, tokens = setup
  graphdef, state = nnx.split(model)
  ref = model.forward(tokens).logits_BxLxV
  found = {}
  for mb in (1, 2):
    fn = jax.jit(
      lambda s, t, mb=mb: nnx.merge(graphdef, s).forward(
        t, routed=plan.routed, microbatches=mb, batch_shards=EP
      )
    )
    np.testing.assert_allclose(fn(state, tokens).logits_BxLxV, ref, atol=1e-5)
    text = fn.lower(state, tokens).compile().as_text()
    # The MoE stack's loop body: the computation holding the dispatch/combine all-to-alls
    # next to the attention GEMMs.
    found[mb] = [
      r for r in map(_independent_pairs, hlo.computations(text).values()) if r[0] and r[1]
    ]
    assert len(found[mb]) == 1, found[mb]
  (a1, _, free1), (a2, attn2, free2) = found[1][0], found[2][0]
  # One batch: every attention op of the layer comes before its dispatch (a chain).
  assert free1 == 0
  # Two halves: twice the all-to-alls, and each is independent of the other half's attention
  # (half of the body's attention ops), so a scheduler may run them at the same time.
  assert a2 == 2 * a1
  assert free2 == a2 * attn2 // 2, (a2, attn2, free2)


@pytest.mark.slow  # two generators compile; the forward-level tests above cover the split
def test_generation_with_two_microbatches(setup):
  model, plan, _ = setup
  prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6], [9], [40, 41, 42, 43]]
  s = SamplingConfig(max_new_tokens=6)
  ref = Generator(model).generate(prompts, s).tokens
  gen = Generator(model, routed=plan.routed, microbatches=2, batch_shards=EP)
  assert gen.generate(prompts, s).tokens == ref
