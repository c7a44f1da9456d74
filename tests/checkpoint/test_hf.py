"""HF checkpoint interop without torch: safetensors I/O, the name mapping, FP8 blocks, strictness.

Parity with transformers itself lives in test_hf_parity.py (needs the `hf` extra).
"""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from configs import dsv3
from dsv3_jax import config as config_lib
from dsv3_jax import pretrained
from dsv3_jax.checkpoint import hf
from dsv3_jax.checkpoint.hf_config import from_hf_config, to_hf_config
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import rope
from dsv3_jax.quant import fp8 as fp8_lib

TINY = dict(
  vocab_size=96,
  hidden_size=64,
  intermediate_size=96,
  moe_intermediate_size=32,
  num_hidden_layers=3,
  first_k_dense_replace=1,
  num_attention_heads=2,
  q_lora_rank=24,
  kv_lora_rank=32,
  qk_nope_head_dim=16,
  qk_rope_head_dim=8,
  v_head_dim=16,
  n_routed_experts=8,
  num_experts_per_tok=2,
  n_group=4,
  topk_group=2,
  num_nextn_predict_layers=1,
  rope_scaling="yarn",
  rope_factor=4.0,
  rope_original_max_position_embeddings=32,
  max_position_embeddings=256,
  init_std=0.05,
  expert_block_size=8,
)


def _cfg(**kw) -> ModelConfig:
  return ModelConfig(**{**TINY, **kw}).validate()


def _tokens(b=2, l=12, v=96, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, l), 0, v)


def random_model(cfg: ModelConfig, seed: int = 1):
  """A model with random weights, built from its abstract state (faster than `create`):
  normal kernels, norm scales near one and positive router biases, so every tensor's
  mapping shows in the output."""
  rng = np.random.RandomState(seed)
  state = hf.abstract_state(cfg)

  def init(path, spec):
    name = getattr(path[-1], "key", None)
    if name == "scale":
      x = 1.0 + 0.2 * rng.randn(*spec.shape)
    elif name == "bias":
      x = rng.uniform(0.0, 0.2, spec.shape)
    else:
      x = rng.randn(*spec.shape) * cfg.init_std
    return jnp.asarray(x, jnp.float32)

  return hf.model_from_state(cfg, jax.tree_util.tree_map_with_path(init, state))


def logits(model, tokens):
  return np.asarray(pretrained.logits(model, tokens))


@functools.partial(jax.jit, static_argnums=0)
def _mtp_logits(graphdef, state, tokens_BxLp1):
  model = nnx.merge(graphdef, state)
  hidden = model.forward(tokens_BxLp1[:, :-1]).hidden_BxLxD
  return model.mtp_forward(hidden, tokens_BxLp1)[0][0]


def mtp_logits(model, tokens_BxLp1):
  graphdef, state = nnx.split(model)
  return np.asarray(_mtp_logits(graphdef, state, tokens_BxLp1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random tiny model and its float32 HF export."""
  model = random_model(_cfg())
  path = str(tmp_path_factory.mktemp("hf32"))
  hf.save_hf(model, path, dtype="float32")
  return model, path


def _all_tensors(path):
  ck = hf.HFCheckpoint(path)
  return {n: np.array(ck.read(n)) for n in ck.tensors}


def _rewrite(src, dst, tensors=None, config_edit=None):
  os.makedirs(dst, exist_ok=True)
  hf.save_tensors(os.path.join(dst, hf.SINGLE_FILE), tensors or _all_tensors(src))
  cfg = hf.read_hf_config(src)
  if config_edit:
    config_edit(cfg)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  return dst


# ----------------------------------------------------------------------------- safetensors
def test_safetensors_roundtrip_every_dtype(tmp_path):
  rng = np.random.RandomState(0)
  tensors = {
    "a.f32": rng.randn(3, 5).astype(np.float32),
    "b.bf16": rng.randn(7).astype(ml_dtypes.bfloat16),
    "c.f8": np.clip(rng.randn(4, 129) * 100, -448, 448).astype(ml_dtypes.float8_e4m3fn),
    "d.i32": rng.randint(-5, 5, (2, 2)).astype(np.int32),
    "e.empty": np.zeros((0, 4), np.float32),
  }
  path = str(tmp_path / "x.safetensors")
  hf.save_tensors(path, tensors)
  header = hf.read_header(path)
  assert set(header) == set(tensors)
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
  assert (8 + n) % 8 == 0  # data 8-byte aligned, as the format recommends
  for name, t in tensors.items():
    back = hf.read_tensor(header[name])
    assert back.dtype == t.dtype and back.shape == t.shape
    assert back.tobytes() == t.tobytes()


# ----------------------------------------------------------------------------- mapping
@pytest.mark.parametrize(
  "kw",
  [
    dict(),
    dict(q_lora_rank=0, first_k_dense_replace=2),
    dict(num_nextn_predict_layers=0, n_shared_experts=0),
    dict(first_k_dense_replace=3, num_nextn_predict_layers=2),
  ],
)
def test_entries_cover_every_parameter_exactly_once(kw):
  cfg = _cfg(**kw)
  state = hf.abstract_state(cfg)
  plan = hf.entries(cfg)
  assert len({e.hf for e in plan}) == len(plan)
  seen = {}
  for e in plan:
    if e.kind in ("shared_embed", "shared_head"):
      continue
    leaf = hf._get(state, e.path)
    ours_shape = leaf.shape[len(e.index) :]
    hf_shape = e.shape[::-1] if e.kind in ("linear", "gate", "head") else e.shape
    assert tuple(ours_shape) == tuple(hf_shape), e.hf
    seen.setdefault(e.path, set()).add(e.index)
  leaves = {
    tuple(getattr(k, "key", getattr(k, "idx", None)) for k in p)
    for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]
  }
  assert leaves == set(seen)
  for path, idx in seen.items():
    leaf = hf._get(state, path)
    n_index = len(next(iter(idx)))
    assert len(idx) == math.prod(leaf.shape[:n_index]), path


def test_float32_export_import_is_exact(tiny):
  model, path = tiny
  back = pretrained.from_pretrained(path, expert_block_size=8)
  assert back.cfg == model.cfg
  _, a = hf.model_state(model)
  _, b = hf.model_state(back)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  tok = _tokens()
  np.testing.assert_array_equal(logits(back, tok), logits(model, tok))
  np.testing.assert_array_equal(mtp_logits(back, tok), mtp_logits(model, tok))


def test_bf16_roundtrip_hf_to_ours_to_hf_is_byte_exact(tiny, tmp_path):
  model, _ = tiny
  first, second = str(tmp_path / "a"), str(tmp_path / "b")
  hf.save_hf(model, first, dtype="bfloat16", max_shard_bytes=100_000)
  assert os.path.exists(os.path.join(first, hf.INDEX_FILE))  # sharded
  hf.save_hf(pretrained.from_pretrained(first), second, dtype="bfloat16", max_shard_bytes=100_000)
  a, b = _all_tensors(first), _all_tensors(second)
  assert a.keys() == b.keys()
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
  assert a["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32
  assert a["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == ml_dtypes.bfloat16


def test_fp8_export_import(tiny, tmp_path):
  model, _ = tiny
  path = str(tmp_path / "fp8")
  hf.save_hf(model, path, fp8=True)
  ck = hf.HFCheckpoint(path)
  name = "model.layers.1.self_attn.q_b_proj.weight"
  assert ck.tensors[name].dtype == "F8_E4M3"
  assert ck.tensors[hf.scale_name(name)].shape == (1, 1)
  for high in (
    "model.layers.1.mlp.gate.weight",
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.layers.3.eh_proj.weight",
    "model.norm.weight",
  ):
    assert ck.tensors[high].dtype == "BF16", high
  with open(os.path.join(path, "config.json")) as f:
    assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]
  back = pretrained.from_pretrained(path, fp8=True)
  assert back.cfg.matmul_precision == "fp8"
  w = np.asarray(model.moe.attn.wq_b.kernel[...][0])  # [in, out]
  q, s = fp8_lib.quantize_hf(w.T)
  got = np.asarray(back.moe.attn.wq_b.kernel[...][0])
  np.testing.assert_array_equal(got, fp8_lib.dequantize_hf(q, s).T)
  # The FP8 dot re-derives the checkpoint's own blocks from the dequantized masters.
  q2, s2 = fp8_lib.quantize_weight(jnp.asarray(got))
  np.testing.assert_array_equal(
    np.asarray(q2)[: w.shape[0], : w.shape[1]].T.view(np.uint8), np.asarray(q).view(np.uint8)
  )
  np.testing.assert_allclose(np.asarray(s2).T, s, rtol=2e-7)
  assert np.isfinite(logits(back, _tokens())).all()
  # FP8 -> ours -> FP8: identical FP8 values, scales within a float32 ulp.
  again = str(tmp_path / "fp8b")
  hf.save_hf(back, again, fp8=True)
  a, b = _all_tensors(path), _all_tensors(again)
  for n in a:
    if n.endswith("weight_scale_inv"):
      np.testing.assert_allclose(b[n], a[n], rtol=2.5e-7)
    else:
      assert a[n].tobytes() == b[n].tobytes(), n


def test_fp8_dequantization_uses_128_blocks_for_ragged_shapes():
  """q_b_proj [192, 128] and kv_a_proj_with_mqa [576, D]: edge blocks are partial 128s."""
  rng = np.random.RandomState(0)
  for shape in ((192, 128), (576, 200)):
    w = (rng.randn(*shape) * rng.lognormal(size=(shape[0], 1))).astype(np.float32)
    q, s = fp8_lib.quantize_hf(w)
    ref = np.empty(shape, np.float32)
    for i in range(0, shape[0], 128):
      for j in range(0, shape[1], 128):
        ref[i : i + 128, j : j + 128] = (
          q[i : i + 128, j : j + 128].astype(np.float32) * s[i // 128, j // 128]
        )
    np.testing.assert_array_equal(fp8_lib.dequantize_hf(q, s), ref)
    s_full = np.repeat(np.repeat(s, 128, 0), 128, 1)[: shape[0], : shape[1]]
    # E4M3: half an ulp is 2^-4 relative for normals, 2^-10 x scale in the subnormal range.
    assert (np.abs(ref - w) <= np.maximum(np.abs(w) / 16, s_full / 1024) * 1.0001).all()
    # The peer's CPU rule (block = rows // scale_rows) gives other blocks or fails here.
    block_m = shape[0] // s.shape[0]
    assert block_m != 128


# ----------------------------------------------------------------------------- strictness
def test_missing_unexpected_and_misshaped_raise_one_error(tiny, tmp_path):
  _, path = tiny
  tensors = _all_tensors(path)
  del tensors["model.layers.0.self_attn.o_proj.weight"]
  del tensors["model.layers.2.mlp.experts.5.down_proj.weight"]
  tensors["model.layers.1.mlp.experts.8.up_proj.weight"] = np.zeros((32, 64), np.float32)
  tensors["model.layers.1.self_attn.kv_b_proj.weight"] = np.zeros((64, 31), np.float32)
  tensors["model.layers.1.self_attn.q_a_proj.weight"] = tensors[
    "model.layers.1.self_attn.q_a_proj.weight"
  ].astype(ml_dtypes.float8_e4m3fn)
  bad = _rewrite(path, str(tmp_path / "bad"), tensors)
  with pytest.raises(ValueError) as err:
    pretrained.from_pretrained(bad)
  msg = str(err.value)
  for name in (
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.2.mlp.experts.5.down_proj.weight",
    "model.layers.1.mlp.experts.8.up_proj.weight",
    "model.layers.1.self_attn.kv_b_proj.weight: [64, 31], expected [64, 32]",
    "model.layers.1.self_attn.q_a_proj.weight_scale_inv",
  ):
    assert name in msg
  assert "3 missing" in msg and "1 unexpected" in msg and "1 mis-shaped" in msg


def test_mtp_modes(tiny, tmp_path):
  model, path = tiny
  tensors = _all_tensors(path)
  no_mtp = {n: t for n, t in tensors.items() if not n.startswith("model.layers.3.")}
  bare = _rewrite(path, str(tmp_path / "bare"), no_mtp)  # config still declares 1 MTP layer
  loaded = pretrained.from_pretrained(bare)
  assert loaded.cfg.num_nextn_predict_layers == 0 and len(loaded.mtp) == 0
  tok = _tokens()
  # Another program (no MTP module), so equal up to float32 rounding.
  np.testing.assert_allclose(logits(loaded, tok), logits(model, tok), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="model.layers.3.eh_proj.weight"):
    pretrained.from_pretrained(bare, mtp=True)
  dropped = pretrained.from_pretrained(path, mtp=False)
  assert dropped.cfg.num_nextn_predict_layers == 0
  partial = dict(no_mtp, **{"model.layers.3.enorm.weight": tensors["model.layers.3.enorm.weight"]})
  with pytest.raises(ValueError, match="missing"):
    pretrained.from_pretrained(_rewrite(path, str(tmp_path / "partial"), partial))
  tensors["model.layers.3.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] + 1
  with pytest.raises(ValueError, match="differs from model.embed_tokens.weight"):
    pretrained.from_pretrained(_rewrite(path, str(tmp_path / "untied"), tensors))


def test_tied_head_and_half_split_rope_layout(tiny, tmp_path):
  model, path = tiny
  cfg = model.cfg
  tensors = _all_tensors(path)
  # rope_interleave=false: the same model with its rope rows in HF's half-split order.
  r = cfg.qk_rope_head_dim
  half = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])  # interleaved -> half split
  for name in list(tensors):
    if name.endswith(("q_b_proj.weight", "q_proj.weight")):
      t = tensors[name].reshape(cfg.num_attention_heads, cfg.qk_head_dim, -1)
      t = np.concatenate([t[:, : cfg.qk_nope_head_dim], t[:, cfg.qk_nope_head_dim :][:, half]], 1)
      tensors[name] = t.reshape(-1, t.shape[-1])
    elif name.endswith("kv_a_proj_with_mqa.weight"):
      k = cfg.kv_lora_rank
      tensors[name] = np.concatenate([tensors[name][:k], tensors[name][k:][half]])
  # tie_word_embeddings: no lm_head, the head is the embedding.
  emb = tensors["model.embed_tokens.weight"]
  tensors.pop("lm_head.weight")
  tensors["model.layers.3.shared_head.head.weight"] = emb

  def edit(c):
    c["rope_interleave"] = False
    c["tie_word_embeddings"] = True

  loaded = pretrained.from_pretrained(_rewrite(path, str(tmp_path / "x"), tensors, edit))
  np.testing.assert_array_equal(np.asarray(loaded.head.kernel[...]), emb.T)
  _, a = hf.model_state(model)
  _, b = hf.model_state(loaded)
  for key in ("moe", "dense"):
    np.testing.assert_array_equal(
      np.asarray(a["params"][key]["attn"]["wkv_a"]["kernel"]),
      np.asarray(b["params"][key]["attn"]["wkv_a"]["kernel"]),
    )
    np.testing.assert_array_equal(
      np.asarray(a["params"][key]["attn"]["wq_b"]["kernel"]),
      np.asarray(b["params"][key]["attn"]["wq_b"]["kernel"]),
    )


# ----------------------------------------------------------------------------- config
def _hf_yarn_reference(scaling: dict, qk_head_dim: int) -> tuple[float, float]:
  """transformers' YaRN rules: (cos/sin factor, softmax scale)."""
  f = scaling["factor"]
  g = lambda s, m=1.0: 0.1 * m * math.log(s) + 1.0 if s > 1 else 1.0
  m, a = scaling.get("mscale"), scaling.get("mscale_all_dim")
  if scaling.get("attention_factor") is not None:
    af = scaling["attention_factor"]
  elif m and a:
    af = g(f, m) / g(f, a)
  else:
    af = g(f)
  scale = qk_head_dim**-0.5 * (g(f, a) ** 2 if a else 1.0)
  return af, scale


PUBLISHED = dict(
  vocab_size=129280,
  hidden_size=7168,
  intermediate_size=18432,
  moe_intermediate_size=2048,
  num_hidden_layers=61,
  first_k_dense_replace=3,
  num_attention_heads=128,
  num_key_value_heads=128,
  q_lora_rank=1536,
  kv_lora_rank=512,
  qk_nope_head_dim=128,
  qk_rope_head_dim=64,
  v_head_dim=128,
  n_routed_experts=256,
  n_shared_experts=1,
  num_experts_per_tok=8,
  n_group=8,
  topk_group=4,
  routed_scaling_factor=2.5,
  scoring_func="sigmoid",
  topk_method="noaux_tc",
  norm_topk_prob=True,
  num_nextn_predict_layers=1,
  rms_norm_eps=1e-6,
  rope_theta=10000,
  max_position_embeddings=163840,
  tie_word_embeddings=False,
  moe_layer_freq=1,
  hidden_act="silu",
  rope_scaling={
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
  },
)


def test_from_hf_config_published_and_newer_layouts():
  cfg = from_hf_config(PUBLISHED)
  assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_theta, cfg.num_nextn_predict_layers) == (
    "yarn",
    40.0,
    1e4,
    1,
  )
  assert abs(rope.softmax_scale(cfg) - 0.1352338) < 1e-6  # YaRN's sqrt(t) (report §4.3)
  newer = {k: v for k, v in PUBLISHED.items() if k not in ("rope_scaling", "rope_theta")}
  newer["rope_parameters"] = dict(PUBLISHED["rope_scaling"], rope_type="yarn", rope_theta=1e4)
  assert from_hf_config(newer) == cfg
  plain = dict(
    PUBLISHED,
    rope_scaling=None,
    q_lora_rank=None,
    n_group=1,
    topk_group=1,
    num_nextn_predict_layers=0,
  )
  cfg = from_hf_config(plain)
  assert (
    cfg.rope_scaling,
    cfg.rope_factor,
    cfg.q_lora_rank,
    cfg.n_group,
    cfg.num_nextn_predict_layers,
  ) == ("none", 1.0, 0, 1, 0)


def test_671b_preset_is_the_published_config():
  """`configs/dsv3.py:671b` lists only what differs from the defaults; it must stay V3's."""
  preset = config_lib.from_dict(dsv3.get_config("671b")).model
  published = from_hf_config(
    PUBLISHED,
    dtype=preset.dtype,
    matmul_precision=preset.matmul_precision,
    expert_block_size=preset.expert_block_size,
  )
  assert preset == published


@pytest.mark.parametrize(
  "scaling",
  [
    {"factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0},
    {"factor": 8, "mscale": 0.8, "mscale_all_dim": 0.7},
    {"factor": 8, "mscale_all_dim": 0.7},
    {"factor": 8, "mscale": 0.8},
    {"factor": 4},
    {"factor": 4, "mscale": 1.0, "mscale_all_dim": 1.0, "attention_factor": 1.3},
  ],
)
def test_yarn_mscale_follows_transformers(scaling):
  hf_cfg = dict(
    PUBLISHED, rope_scaling=dict(scaling, type="yarn", original_max_position_embeddings=4096)
  )
  cfg = from_hf_config(hf_cfg)
  af, scale = _hf_yarn_reference(scaling, cfg.qk_head_dim)
  assert rope.attention_factor(cfg) == pytest.approx(af, rel=1e-12)
  assert rope.softmax_scale(cfg) == pytest.approx(scale, rel=1e-12)
  again = from_hf_config(json.loads(json.dumps(to_hf_config(cfg))))
  assert rope.attention_factor(again) == pytest.approx(af, rel=1e-12)
  assert rope.softmax_scale(again) == pytest.approx(scale, rel=1e-12)


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(topk_method="group_limited_greedy"), "topk_method"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling type"),
  ],
)
def test_from_hf_config_rejects_what_it_cannot_honour(change, match):
  with pytest.raises(ValueError, match=match):
    from_hf_config(dict(PUBLISHED, **change))


def test_to_hf_config_roundtrip():
  cfg = _cfg(q_lora_rank=0, n_group=1, topk_group=1, rope_mscale=0.9, rope_mscale_all_dim=0.6)
  again = from_hf_config(to_hf_config(cfg), expert_block_size=cfg.expert_block_size)
  assert again == cfg


@pytest.mark.parametrize("scaling", ["none", "yarn"])
def test_rope_scaling_survives_hf_round_trip(scaling):
  """YaRN is exported as `rope_scaling` only when the config asks for it, and comes back."""
  plain = dict(rope_factor=1.0, rope_original_max_position_embeddings=4096)  # HF keeps no YaRN
  cfg = _cfg(rope_scaling=scaling, **(plain if scaling == "none" else {}))
  hf_cfg = json.loads(json.dumps(to_hf_config(cfg)))
  if scaling == "yarn":
    assert hf_cfg["rope_scaling"]["rope_type"] == "yarn"
    assert hf_cfg["rope_scaling"]["factor"] == 4.0
  else:
    assert hf_cfg["rope_scaling"] is None
  again = from_hf_config(hf_cfg, expert_block_size=cfg.expert_block_size)
  assert again.rope_scaling == scaling
  assert again == cfg


def test_hf_yarn_at_factor_one_is_plain_rope():
  scaling = dict(PUBLISHED["rope_scaling"], factor=1.0)
  assert from_hf_config(dict(PUBLISHED, rope_scaling=scaling)).rope_scaling == "none"
  with pytest.raises(ValueError, match="attention_factor"):
    from_hf_config(dict(PUBLISHED, rope_scaling=dict(scaling, attention_factor=1.2)))
  with pytest.raises(ValueError, match="factor"):
    from_hf_config(dict(PUBLISHED, rope_scaling=dict(scaling, factor=0.5)))


# ----------------------------------------------------------------------------- formats, tools
def test_orbax_roundtrip_and_checkpoint_kinds(tiny, tmp_path):
  model, path = tiny
  assert pretrained.checkpoint_kind(path) == "hf"
  out = str(tmp_path / "orbax")
  pretrained.save_pretrained(model, out, format="orbax")
  assert pretrained.checkpoint_kind(out) == "orbax"
  back = pretrained.from_pretrained(out, dtype=jnp.float32)
  tok = _tokens()
  np.testing.assert_array_equal(logits(back, tok), logits(model, tok))
  with pytest.raises(ValueError, match="neither a HF directory"):
    pretrained.checkpoint_kind(str(tmp_path))
  with pytest.raises(ValueError, match="dtype"):
    pretrained.from_pretrained(out, dtype="float16")


def test_convert_hf_to_orbax_and_back(tiny, tmp_path):
  from dsv3_jax.checkpoint.convert import convert

  model, path = tiny
  orb, back = str(tmp_path / "orb"), str(tmp_path / "back")
  assert convert(path, orb, "orbax")["mtp_depth"] == 1
  summary = convert(orb, back, "hf", dtype="float32")
  assert summary["fp8"] is False and summary["tensors"] == len(hf.entries(model.cfg))
  a, b = _all_tensors(path), _all_tensors(back)
  assert a.keys() == b.keys() and all(a[n].tobytes() == b[n].tobytes() for n in a)


def test_hidden_states_end_at_the_models_output(tiny):
  model, _ = tiny
  tok = _tokens()
  hs = pretrained.hidden_states(model, tok)
  assert len(hs) == model.cfg.num_hidden_layers + 1
  np.testing.assert_allclose(
    np.asarray(model.logits(model.norm(hs[-1]))), logits(model, tok), rtol=1e-5, atol=1e-5
  )


def test_evaluate_scores_every_token_once(tiny, tmp_path):
  from dsv3_jax.inference.score import read_tokens, score

  model, _ = tiny
  tokens = np.asarray(_tokens(1, 30, seed=5)).reshape(-1)
  dump = np.zeros((3, 12, model.cfg.vocab_size), np.float32)
  res = score(model, tokens, seq_len=12, batch=2, logits_out=dump)
  assert res["tokens_scored"] == 29 and res["windows"] == 3
  windows = jnp.asarray(np.stack([tokens[0:12], tokens[12:24]]))
  want_logits = logits(model, windows)
  np.testing.assert_allclose(dump[:2], want_logits, rtol=1e-5, atol=1e-5)
  logp = np.asarray(jax.nn.log_softmax(want_logits, axis=-1))
  want = np.take_along_axis(logp.reshape(24, -1), tokens[1:25, None], axis=-1)[:, 0]
  np.testing.assert_allclose(res["logprobs"][:24], want, rtol=1e-5, atol=1e-5)
  assert res["perplexity"] == pytest.approx(math.exp(-res["logprobs"].astype(np.float64).mean()))
  path = str(tmp_path / "ids.txt")
  with open(path, "w") as f:
    f.write(" ".join(map(str, tokens)))
  np.testing.assert_array_equal(read_tokens(path), tokens)
  with pytest.raises(ValueError, match="outside the model's vocab"):
    score(model, np.array([1, 2, 500]), seq_len=4)
