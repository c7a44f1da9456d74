"""MTP self-speculative decoding: greedy identity with plain decoding (random tiny model, HF
round trip, briefly trained checkpoint), the acceptance rule's output law, a sampled run's
law at the verified position, EOS, drafter baselines and the metrics."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dsv3
from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib
from dsv3_jax.inference.generate import Generator, SamplingConfig, filter_logits
from dsv3_jax.serving import drafters, speculative
from dsv3_jax.serving.speculative import SpeculativeGenerator, speculative_accept

# Different lengths in one batch (right padding, per-sequence positions).
PROMPTS = [[5, 17, 33, 2, 9], [100], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 1]]


def _tiny(**overrides):
  cfg = config_lib.from_dict(dsv3.get_config("tiny")).model
  return dataclasses.replace(cfg, **overrides).validate()


@pytest.fixture(scope="module")
def model():
  # A larger init makes the random model's argmax decisive (no near-ties), as in
  # tests/inference/test_generate.py.
  cfg = _tiny(init_std=0.5, num_nextn_predict_layers=1)
  return model_lib.create(cfg, seed=3)


@pytest.fixture(scope="module")
def spec(model):
  return SpeculativeGenerator(model, cache_dtype=jnp.float32)


@pytest.fixture(scope="module")
def spec3(model):
  # Only ids 0..2 may be generated: the random MTP head's drafts are then often right, so
  # steps with both accepted and rejected drafts occur. The default bfloat16 cache.
  return SpeculativeGenerator(model, vocab_limit=3)


@pytest.fixture(scope="module")
def plain(model):
  return Generator(model, cache_dtype=jnp.float32)


@pytest.fixture(scope="module")
def plain3(model):
  return Generator(model, vocab_limit=3)


def _jit(fn, model):
  """`fn(model, *args)` as one jitted program (eager nnx calls dispatch op by op)."""
  graphdef, state = nnx.split(model)
  return functools.partial(jax.jit(lambda st, *args: fn(nnx.merge(graphdef, st), *args)), state)


# ----------------------------------------------------------------------------- the rule
@pytest.mark.parametrize(
  "p, q",
  [
    ([0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.1, 0.1, 0.1, 0.5]),
    ([0.0, 0.3, 0.0, 0.7, 0.0, 0.0], [0.4, 0.1, 0.2, 0.1, 0.1, 0.1]),  # q covers more than p
    ([0.2, 0.2, 0.2, 0.2, 0.1, 0.1], [0.0, 0.0, 0.9, 0.1, 0.0, 0.0]),  # q misses most of p
  ],
)
def test_accept_rule_emits_the_target_law(p, q):
  n = 200_000
  p_V, q_V = jnp.array(p), jnp.array(q)
  key_d, key_a = jax.random.split(jax.random.key(0))
  draft_N = jax.random.categorical(key_d, jnp.log(jnp.broadcast_to(q_V, (n, 6))), axis=-1)
  token_N, accepted_N = speculative_accept(
    jnp.broadcast_to(p_V, (n, 6)), jnp.broadcast_to(q_V, (n, 6)), draft_N, key_a
  )
  freq = np.bincount(np.asarray(token_N), minlength=6) / n
  p_np = np.array(p)
  assert freq[p_np == 0].sum() == 0  # never a token the target excludes
  assert 0.5 * np.abs(freq - p_np).sum() < 0.006  # total variation (4 sigma ~ 0.004)
  support = p_np > 0
  chi2 = n * ((freq[support] - p_np[support]) ** 2 / p_np[support]).sum()
  assert chi2 < 25.7  # chi-square, <= 5 degrees of freedom, p-value 1e-4
  # The acceptance rate is sum_v min(p, q).
  np.testing.assert_allclose(float(accepted_N.mean()), np.minimum(p_np, q).sum(), atol=0.005)


def test_accept_rule_keeps_every_draft_when_q_equals_p():
  p = jnp.broadcast_to(jnp.array([0.6, 0.3, 0.1]), (1000, 3))
  draft = jax.random.categorical(jax.random.key(1), jnp.log(p), axis=-1)
  token, accepted = speculative_accept(p, p, draft, jax.random.key(2))
  assert bool(accepted.all()) and bool((token == draft).all())


def test_accept_rule_checks_shapes():
  with pytest.raises(ValueError, match="must both be"):
    speculative_accept(
      jnp.ones((2, 3)) / 3, jnp.ones((2, 4)) / 4, jnp.zeros((2,), jnp.int32), jax.random.key(0)
    )


# ----------------------------------------------------------------------------- greedy
def test_mtp_hidden_is_the_mtp_module(model):
  """The decoder's MTP call composes the module exactly as `MTPModule.__call__` does."""
  from dsv3_jax.layers.mla import init_latent_cache

  b, l = 2, 6

  def both(m, tokens):
    out = m.forward(tokens[:, :l])
    pos = jnp.broadcast_to(jnp.arange(l), (b, l))
    ctx = m.context(pos)
    _, want, _, _ = m.mtp[0](out.hidden_BxLxD, m.embed_tokens(tokens[:, 1:]), pos, ctx.cos, ctx.sin)
    got, _ = speculative.mtp_hidden(m, out.hidden_BxLxD, tokens[:, 1:], pos, None)
    cache = init_latent_cache(m.cfg, b, 16, jnp.float32)
    absorbed, _ = speculative.mtp_hidden(
      m, out.hidden_BxLxD, tokens[:, 1:], pos, cache, absorb=True
    )
    return want, got, absorbed

  tokens = jax.random.randint(jax.random.key(0), (b, l + 1), 0, model.cfg.vocab_size)
  want, got, absorbed = _jit(both, model)(tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Absorbed attention over a cache (decode) agrees up to rounding.
  np.testing.assert_allclose(np.asarray(absorbed), np.asarray(want), atol=2e-4, rtol=2e-4)


def test_greedy_equals_plain_random_model(spec, plain):
  sampling = SamplingConfig(max_new_tokens=9)
  got = spec.generate(PROMPTS, sampling)
  assert got.tokens == plain.generate(PROMPTS, sampling).tokens
  assert all(len(t) == 9 for t in got.tokens)
  assert got.drafted >= got.steps >= 8 / 2


def test_greedy_equals_plain_with_accepted_drafts(spec3, plain3):
  """Batch > 1 of different lengths and batch 1, both kinds of steps exercised."""
  sampling = SamplingConfig(max_new_tokens=12)
  got = spec3.generate(PROMPTS, sampling)
  want = plain3.generate(PROMPTS, sampling).tokens
  assert got.tokens == want
  assert 0 < got.accepted < got.drafted  # both paths ran
  assert got.steps < 11  # fewer main forwards than plain decoding's 11 decode steps
  assert got.tokens_per_forward == pytest.approx(1 + got.acceptance_rate)
  assert spec3.generate(PROMPTS[1:2], sampling).tokens == want[1:2]  # batch 1


def test_eos_stops_like_plain(spec3, plain3):
  free = spec3.generate(PROMPTS, SamplingConfig(max_new_tokens=12)).tokens
  eos = free[0][4]
  sampling = SamplingConfig(max_new_tokens=12, eos_id=eos)
  got = spec3.generate(PROMPTS, sampling)
  want = plain3.generate(PROMPTS, sampling)
  assert got.tokens == want.tokens and got.finished == want.finished
  assert got.finished[0]
  assert got.new_tokens == sum(len(t) + f for t, f in zip(got.tokens, got.finished))


def test_hf_round_trip_greedy_equals_plain(model, spec3, tmp_path):
  """A random model exported in the HF layout and reloaded with its MTP layer."""
  from dsv3_jax import pretrained

  pretrained.save_pretrained(model, str(tmp_path), format="hf", dtype="float32")
  loaded = pretrained.from_pretrained(str(tmp_path), mtp=True)
  assert len(loaded.mtp) == 1
  sampling = SamplingConfig(max_new_tokens=12)
  gen = SpeculativeGenerator(loaded, vocab_limit=3)
  got = gen.generate(PROMPTS, sampling)
  assert got.tokens == gen.plain_generate(PROMPTS, sampling).tokens
  assert 0 < got.accepted
  # The loaded MTP drafts as the original did.
  want = spec3.generate(PROMPTS, sampling)
  assert (got.tokens, got.accepted, got.steps) == (want.tokens, want.accepted, want.steps)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The tiny model after a few optimizer steps of `experiments/train.py`'s loop, loaded
  back from its workdir."""
  from dsv3_jax import pretrained
  from dsv3_jax.train.loop import train_and_evaluate

  workdir = str(tmp_path_factory.mktemp("trained"))
  cfg = dsv3.get_config("tiny")
  cfg.train.update(steps=3, eval_every=3, checkpoint_every=3)
  summary = train_and_evaluate(cfg, workdir, progress=False)
  return pretrained.from_pretrained(workdir), summary


@pytest.mark.slow  # compiles a train step (about a minute of CPU)
def test_trained_checkpoint_greedy_equals_plain(trained):
  model, _ = trained
  assert len(model.mtp) == 1
  prompts = [list(b"The model "), list(b"def f(x):\n  return"), list(b"a")]
  gen = SpeculativeGenerator(model)
  sampling = SamplingConfig(max_new_tokens=16)
  got = gen.generate(prompts, sampling)
  assert got.tokens == gen.plain_generate(prompts, sampling).tokens
  assert gen.generate(prompts[:1], sampling).tokens == got.tokens[:1]


# ----------------------------------------------------------------------------- sampling
def test_sampled_run_gives_valid_tokens(model, spec):
  sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=40, seed=5)
  got = spec.generate(PROMPTS, sampling)
  for row in got.tokens:
    assert len(row) == 10 and all(0 <= t < model.cfg.vocab_size for t in row)
  again = spec.generate(PROMPTS, sampling)
  assert again.tokens == got.tokens  # same seed, same tokens
  other = spec.generate(PROMPTS, dataclasses.replace(sampling, seed=6))
  assert other.tokens != got.tokens


def test_sampled_verified_token_has_the_main_models_law(model, spec3):
  """Token 2 of each sequence is the verified draft (or its replacement): given token 1 it
  must follow the main model's distribution, whatever the MTP head proposed."""
  n, temperature = 1200, 1.5
  prompt = PROMPTS[0]
  sampling = SamplingConfig(max_new_tokens=2, temperature=temperature, seed=11)
  got = spec3.generate([prompt] * n, sampling)
  assert 0 < got.accepted < got.drafted
  rows = np.array(got.tokens)
  checked = 0
  for t0 in range(3):
    second = rows[rows[:, 0] == t0, 1]
    if len(second) < 150:
      continue
    logits = model(jnp.array([prompt + [t0]]))[:, -1]
    logits = jnp.where(jnp.arange(logits.shape[-1]) < 3, logits, -jnp.inf)
    p = np.asarray(jax.nn.softmax(filter_logits(logits, temperature, 0, 1.0), -1))[0, :3]
    freq = np.bincount(second, minlength=3) / len(second)
    keep = p > 1e-3
    chi2 = len(second) * ((freq[keep] - p[keep]) ** 2 / p[keep]).sum()
    assert chi2 < 18.4, (t0, freq, p)  # 2 degrees of freedom, p-value 1e-4
    checked += 1
  assert checked >= 1


# ----------------------------------------------------------------------------- errors
def test_model_without_mtp_is_refused():
  plain_model = model_lib.create(_tiny(num_nextn_predict_layers=0), seed=0)
  with pytest.raises(ValueError, match="no MTP|has none"):
    SpeculativeGenerator(plain_model)


def test_prompts_are_validated(spec):
  with pytest.raises(ValueError, match="empty"):
    spec.generate([[]])
  with pytest.raises(ValueError, match="outside the vocabulary"):
    spec.generate([[1, 10_000]])


# ----------------------------------------------------------------------------- metrics
def test_measure_reports_acceptance_and_speed(model):
  m = speculative.measure(model, PROMPTS, max_new_tokens=12, reps=1, vocab_limit=3)
  assert m["identical_to_plain"] is True
  assert 0 <= m["acceptance_rate"] <= 1
  assert m["tokens_per_forward"] == pytest.approx(1 + m["acceptance_rate"])
  assert m["main_forwards"] < m["plain_main_forwards"] == 12
  assert m["step_cost"] > 0
  assert m["speculative_tokens_per_s"] > 0 and m["plain_tokens_per_s"] > 0
  assert m["speedup"] == pytest.approx(m["speculative_tokens_per_s"] / m["plain_tokens_per_s"])


def test_baseline_drafters():
  tokens = np.array([[1, 2, 3, 1, 2, 4]])
  np.testing.assert_array_equal(drafters.copy_last_drafts(tokens), [[2, 3, 1, 2, 4, 4]])
  bigram = drafters.BigramDrafter.fit([1, 2, 1, 2, 1, 3, 5, 5], vocab_size=6)
  # 1 -> 2 (twice) beats 1 -> 3; 0 and 4 never precede anything: the most frequent token.
  np.testing.assert_array_equal(bigram.table_V, [1, 2, 1, 5, 1, 5])
  np.testing.assert_array_equal(bigram.drafts(tokens), [[1, 5, 2, 1, 1, 1]])
  with pytest.raises(ValueError, match="length >= 3"):
    drafters.copy_last_drafts(np.array([[1, 2]]))
  with pytest.raises(ValueError, match=r"\[0, 6\)"):
    drafters.BigramDrafter.fit([1, 7], vocab_size=6)


def test_teacher_forced_acceptance(model):
  tokens = jax.random.randint(jax.random.key(4), (3, 12), 0, 3)
  bigram = drafters.BigramDrafter.fit(np.asarray(tokens).ravel(), model.cfg.vocab_size)
  res = drafters.teacher_forced_acceptance(
    model, tokens, bigram=bigram, vocab_limit=3, batch_size=3
  )
  assert res["positions"] == 3 * 10
  assert set(res) == {"positions", "main_vs_text", "mtp", "mtp_untrained", "copy_last", "bigram"}

  # `mtp` is exactly the model's own MTP head (`mtp_forward`), argmax over the allowed ids.
  def reference(m, tokens):
    logits, _, _ = m.mtp_forward(m.forward(tokens[:, :-1]).hidden_BxLxD, tokens)
    return jnp.argmax(logits[0][..., :3], -1), jnp.argmax(m(tokens)[..., :3], -1)

  want, main = (np.asarray(x) for x in _jit(reference, model)(tokens))
  want = want[:, :-1]
  np.testing.assert_allclose(res["mtp"]["vs_text"], np.mean(want == np.asarray(tokens)[:, 2:]))
  np.testing.assert_allclose(res["mtp"]["vs_main"], np.mean(want == main[:, 1:-1]))
  for name in ("mtp_untrained", "copy_last", "bigram"):
    assert 0 <= res[name]["vs_text"] <= 1 and 0 <= res[name]["vs_main"] <= 1
