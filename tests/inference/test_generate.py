"""Generation: cache-consistent greedy decoding, batching, EOS, sampling filters, errors."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from configs import dsv3
from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib
from dsv3_jax.inference.generate import Generator, SamplingConfig, sample


@pytest.fixture(scope="module")
def model():
  cfg = config_lib.from_dict(dsv3.get_config("tiny")).model
  # A larger init makes the random model's argmax decisive (no near-ties).
  return model_lib.create(dataclasses.replace(cfg, init_std=0.5), seed=3)


@pytest.fixture(scope="module")
def gen(model):
  return Generator(model, cache_dtype=jnp.float32)


PROMPTS = [[5, 17, 33, 2, 9], [100], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 1]]


def test_logits_at_one_position_per_sequence(model):
  """`forward(logits_at_B=...)` (what a prefill samples from) equals the full logits there;
  the hidden state and the cache are the whole walk's."""
  tokens = jnp.asarray([(PROMPTS[0] * 3)[:8], PROMPTS[2][:8]], jnp.int32)
  at = jnp.asarray([7, 3], jnp.int32)
  cache = model.init_cache(2, 16, jnp.float32)
  full, part = (
    model.forward(tokens, cache=cache),
    model.forward(tokens, cache=cache, logits_at_B=at),
  )
  assert part.logits_BxLxV.shape == (2, 1, model.cfg.vocab_size)
  np.testing.assert_allclose(
    part.logits_BxLxV[:, 0], full.logits_BxLxV[jnp.arange(2), at], rtol=1e-5, atol=1e-5
  )
  np.testing.assert_array_equal(part.hidden_BxLxD, full.hidden_BxLxD)
  np.testing.assert_array_equal(part.cache.moe.c_kv_BxTxK, full.cache.moe.c_kv_BxTxK)


def test_greedy_matches_full_forward(model, gen):
  """Each decoded token is the argmax of a fresh, cache-free forward over all before it."""
  out = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=6))
  for prompt, new in zip(PROMPTS, out.tokens):
    assert len(new) == 6
    seq = np.array([prompt + new], np.int32)
    logits = np.asarray(model(seq))[0]
    want = logits[len(prompt) - 1 : -1].argmax(-1)
    np.testing.assert_array_equal(want, new)


def test_batch_equals_single(gen):
  cfg = SamplingConfig(max_new_tokens=5)
  batched = gen.generate(PROMPTS, cfg).tokens
  for prompt, want in zip(PROMPTS, batched):
    assert gen.generate([prompt], cfg).tokens[0] == want


def test_bf16_cache_close_to_f32(model, gen):
  bf16 = Generator(model)  # default cache dtype
  assert (
    bf16.cache_bytes_per_token()
    == model.cfg.num_hidden_layers * (model.cfg.kv_lora_rank + model.cfg.qk_rope_head_dim) * 2
  )
  a = bf16.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=4)).tokens[0]
  b = gen.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=4)).tokens[0]
  assert a[:2] == b[:2]


def test_eos_stops_sequence(gen):
  free = gen.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=6)).tokens[0]
  eos = free[2]
  first = free.index(eos)
  out = gen.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=6, eos_id=eos))
  assert out.finished == [True]
  assert out.tokens[0] == free[:first]


def test_sampling_filters():
  logits = jnp.array([[0.0, 3.0, 1.0, 2.0]])
  key = jnp.zeros((2,), jnp.uint32)
  import jax

  key = jax.random.key(0)
  assert int(sample(logits, key, 0.0, 0, 1.0)[0]) == 1
  # top_k=1 and a tiny nucleus both collapse to the argmax, whatever the temperature.
  for seed in range(5):
    k = jax.random.key(seed)
    assert int(sample(logits, k, 2.0, 1, 1.0)[0]) == 1
    assert int(sample(logits, k, 2.0, 0, 0.01)[0]) == 1
  # top_k=2 never picks outside the two best.
  picks = {int(sample(logits, jax.random.key(s), 5.0, 2, 1.0)[0]) for s in range(40)}
  assert picks <= {1, 3} and len(picks) == 2


def test_seeded_sampling_reproducible(gen):
  cfg = SamplingConfig(max_new_tokens=5, temperature=1.0, seed=7)
  assert gen.generate(PROMPTS, cfg).tokens == gen.generate(PROMPTS, cfg).tokens


@pytest.mark.parametrize(
  "prompts, kwargs, match",
  [
    ([[1, 2, 99999]], {}, "outside the vocabulary"),
    ([[1, -1]], {}, "outside the vocabulary"),
    ([[]], {}, "empty"),
    ([], {}, "no prompts"),
    ([[1] * 250], {"max_new_tokens": 10}, "exceeds the model's context"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([[1]], {"top_p": 0.0}, "top_p"),
    ([[1]], {"temperature": -1.0}, "temperature"),
  ],
)
def test_bad_input_errors(gen, prompts, kwargs, match):
  with pytest.raises(ValueError, match=match):
    gen.generate(prompts, SamplingConfig(**kwargs))


def test_vocab_limit_respected(model):
  limited = Generator(model, cache_dtype=jnp.float32, vocab_limit=50)
  out = limited.generate(PROMPTS, SamplingConfig(max_new_tokens=6, temperature=3.0, seed=1))
  assert all(0 <= t < 50 for seq in out.tokens for t in seq)


def test_unstacked_layers_decode_like_the_scanned_stacks(model, gen):
  """`Generator` runs per-layer weights (`unstack_layers`): same logits, caches and greedy
  tokens as the scanned stacks, and the caller's model keeps its stacks."""
  from flax import nnx

  flat = model_lib.unstack_layers(model)
  assert isinstance(flat.moe, nnx.List) and len(flat.moe) == model.cfg.n_moe_layers
  assert flat.moe[0].ffn.w1[...].shape == model.moe.ffn.w1[...].shape[1:]
  assert not isinstance(model.moe, nnx.List)
  tokens = jnp.asarray([PROMPTS[0] * 3], jnp.int32)
  cache = model.init_cache(1, 32, jnp.float32)
  want, got = model.forward(tokens, cache=cache), flat.forward(tokens, cache=cache)
  # Logits reach |7|: one float32 rounding of a different summation order is ~1e-5 there.
  np.testing.assert_allclose(got.logits_BxLxV, want.logits_BxLxV, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(got.load_LxE, want.load_LxE)
  np.testing.assert_allclose(
    got.cache.moe.c_kv_BxTxK, want.cache.moe.c_kv_BxTxK, rtol=1e-5, atol=1e-5
  )
  stacked = Generator(model, cache_dtype=jnp.float32, unstack=False)
  cfg = SamplingConfig(max_new_tokens=6)
  assert stacked.generate(PROMPTS, cfg).tokens == gen.generate(PROMPTS, cfg).tokens


def test_decoding_reads_absorption_weights_head_major(model):
  """The unstacked layers keep W_UK / W_UV head-major (`MLA.arrange_for_decoding`): a decode
  step equals the scanned model's, and its program copies no weight into head-major order,
  where the scanned model's step does (a transpose per weight and layer)."""
  import jax
  from flax import nnx

  cfg = model.cfg
  flat = model_lib.unstack_layers(model)
  h, n, k = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
  w = model.moe.attn.wkv_b.kernel[...][0].reshape(k, h, n + cfg.v_head_dim)
  uk, uv = (a[...] for a in flat.moe[0].attn.head_major)
  np.testing.assert_array_equal(uk, np.transpose(w[..., :n], (1, 2, 0)))
  np.testing.assert_array_equal(uv, np.transpose(w[..., n:], (1, 0, 2)))

  prompt = (PROMPTS[0] * 3)[:6]
  tokens = jnp.asarray([prompt[:5]], jnp.int32)
  cache = model.forward(tokens, cache=model.init_cache(1, 16, jnp.float32)).cache
  step = jnp.asarray([prompt[5:]], jnp.int32)
  positions = jnp.asarray([[5]], jnp.int32)

  def program(m):
    graphdef, state = nnx.split(m)

    def f(state, cache):
      out = nnx.merge(graphdef, state).forward(step, positions, cache=cache)
      return out.logits_BxLxV

    return jax.jit(f), state

  (f_flat, s_flat), (f_scan, s_scan) = program(flat), program(model)
  np.testing.assert_allclose(f_flat(s_flat, cache), f_scan(s_scan, cache), rtol=1e-5, atol=1e-5)

  def head_major_copies(f, state):
    hlo = f.lower(state, cache).compile().as_text()
    shapes = (f"f32[{h},{n},{k}]", f"f32[{h},{k},{cfg.v_head_dim}]")
    return sum(
      "transpose" in line and "fusion(" in line and any(s in line for s in shapes)
      for line in hlo.splitlines()
    )

  assert head_major_copies(f_scan, s_scan) > 0
  assert head_major_copies(f_flat, s_flat) == 0
