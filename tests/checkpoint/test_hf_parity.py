"""Parity with the transformers DeepSeek-V3 implementation (needs the `hf` extra).

Random tiny `DeepseekV3Config`s are instantiated in transformers, saved with `save_pretrained`
(float32), loaded here with `from_pretrained`, and compared: full-forward logits and every
layer's hidden state (`output_hidden_states=True`), plus the MTP layer against transformers'
own `MtpModel` loader. Our own exports are loaded back into transformers the same way.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from dsv3_jax import pretrained  # noqa: E402
from dsv3_jax.checkpoint import hf  # noqa: E402
from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.layers import routing as routing_lib  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)

BASE = dict(
  vocab_size=80,
  hidden_size=48,
  intermediate_size=64,
  moe_intermediate_size=24,
  num_attention_heads=3,
  kv_lora_rank=24,
  qk_nope_head_dim=8,
  qk_rope_head_dim=8,
  v_head_dim=12,
  n_routed_experts=8,
  num_experts_per_tok=3,
  max_position_embeddings=128,
  initializer_range=0.1,
)


def _yarn(**kw):
  return dict(
    rope_type="yarn",
    factor=4.0,
    original_max_position_embeddings=32,
    beta_fast=32,
    beta_slow=1,
    rope_theta=10000.0,
    **kw,
  )


CASES = {
  # YaRN with distinct mscale / mscale_all_dim, low-rank query, group-limited routing, MTP.
  "yarn_qlora_groups_mtp": dict(
    num_hidden_layers=3,
    first_k_dense_replace=1,
    q_lora_rank=16,
    n_group=4,
    topk_group=2,
    num_mtp_layers=1,
    rope_parameters=_yarn(mscale=0.8, mscale_all_dim=0.7),
  ),
  # Plain RoPE, full-rank query (q_lora_rank null), one expert group, 2 dense layers.
  "plain_qnull_nogroups_2dense": dict(
    num_hidden_layers=3,
    first_k_dense_replace=2,
    q_lora_rank=None,
    n_group=1,
    topk_group=1,
    num_mtp_layers=0,
    rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
  ),
  # YaRN (V3's mscale 1/1), half-split rope layout, unnormalised weights, 2 shared experts.
  "yarn_halfsplit_unnormed": dict(
    num_hidden_layers=3,
    first_k_dense_replace=1,
    q_lora_rank=20,
    n_group=2,
    topk_group=1,
    num_mtp_layers=0,
    norm_topk_prob=False,
    n_shared_experts=2,
    rope_interleave=False,
    routed_scaling_factor=1.5,
    rope_parameters=_yarn(mscale=1.0, mscale_all_dim=1.0),
  ),
}


def _randomize(model, seed):
  """Norm weights away from one and positive routing biases (so HF's and DeepSeek's group
  masks agree), so that every tensor's mapping shows in the outputs."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.05 + 0.25 * torch.rand(b.shape, generator=g))


def _mtp_tensors(model, cfg, seed) -> dict:
  """A random MTP layer in the published layout: `model.layers.{N}.*`, experts per expert."""
  from transformers.modeling_layers import MtpModel

  torch.manual_seed(seed)
  mtp = MtpModel(model, 1)
  # MtpModel leaves some of its layer's weights as allocated (torch.empty): whatever memory
  # held, NaN included. Draw every one of them, as HF's initializer would.
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in mtp.named_parameters():
      if name.startswith("layers.0."):
        p.copy_(cfg.initializer_range * torch.randn(p.shape, generator=g))
  _randomize(mtp, seed)
  f, n = cfg.moe_intermediate_size, cfg.num_hidden_layers
  out, p = {}, f"model.layers.{n}."
  for k, v in mtp.state_dict().items():
    if not k.startswith("layers.0."):
      continue
    k, v = k[len("layers.0.") :], v.detach().float().numpy()
    if k == "mtp_block.mlp.experts.gate_up_proj":  # fused in memory only: [E, 2F, D]
      for j in range(v.shape[0]):
        out[f"{p}mlp.experts.{j}.gate_proj.weight"] = v[j, :f]
        out[f"{p}mlp.experts.{j}.up_proj.weight"] = v[j, f:]
    elif k == "mtp_block.mlp.experts.down_proj":
      for j in range(v.shape[0]):
        out[f"{p}mlp.experts.{j}.down_proj.weight"] = v[j]
    else:
      k = k.replace("mtp_block.", "").replace("post_norm.", "shared_head.norm.")
      out[p + k] = v
  out[p + "embed_tokens.weight"] = model.model.embed_tokens.weight.detach().numpy()
  out[p + "shared_head.head.weight"] = model.lm_head.weight.detach().numpy()
  assert all(np.isfinite(v).all() for v in out.values())
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _make_hf(path, seed, **kw):
  torch.manual_seed(seed)
  cfg = DeepseekV3Config(**{**BASE, **kw}, num_key_value_heads=BASE["num_attention_heads"])
  model = DeepseekV3ForCausalLM(cfg).eval()
  _randomize(model, seed)
  model.save_pretrained(path)
  if cfg.num_mtp_layers:
    # transformers writes no MTP tensors; add them as a second shard, as the published
    # checkpoint does, so that both loaders read them from the same files.
    main = "model-00001-of-00002.safetensors"
    os.rename(os.path.join(path, hf.SINGLE_FILE), os.path.join(path, main))
    extra = _mtp_tensors(model, cfg, seed + 1)
    hf.save_tensors(os.path.join(path, "model-00002-of-00002.safetensors"), extra)
    weight_map = {n: main for n in hf.read_header(os.path.join(path, main))}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in extra})
    with open(os.path.join(path, hf.INDEX_FILE), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return model


def _tokens(vocab, b=2, l=16, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (b, l))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_hidden_states_match_transformers(case, tmp_path):
  kw = CASES[case]
  model = _make_hf(str(tmp_path), seed=len(case), **kw)
  ours = pretrained.from_pretrained(str(tmp_path), expert_block_size=8)
  assert ours.cfg.num_nextn_predict_layers == kw["num_mtp_layers"]
  assert ours.cfg.q_lora_rank == (kw["q_lora_rank"] or 0)
  tok = _tokens(BASE["vocab_size"])
  with torch.no_grad():
    out = model(torch.tensor(tok), output_hidden_states=True)
  ref = out.logits.numpy()
  assert np.abs(ref).max() > 0.5  # not a degenerate comparison
  np.testing.assert_allclose(np.asarray(pretrained.logits(ours, jnp.asarray(tok))), ref, **TOL)
  # Layer by layer: HF gives [embeddings, block 0, ..., block N-2, norm(block N-1)].
  hs = pretrained.hidden_states(ours, jnp.asarray(tok))
  n = len(hs) - 1
  assert len(out.hidden_states) == n + 1
  for i in range(n):
    np.testing.assert_allclose(
      np.asarray(hs[i]), out.hidden_states[i].numpy(), **TOL, err_msg=f"{case}: hidden state {i}"
    )
  np.testing.assert_allclose(np.asarray(ours.norm(hs[n])), out.hidden_states[n].numpy(), **TOL)

  if kw["num_mtp_layers"]:
    from transformers.modeling_layers import MtpModel

    # transformers finds MTP tensors by a pattern hard-wired to layer 61; point it at ours.
    main = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path)).eval()
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}\..*"]
    mtp = MtpModel.from_pretrained(main).eval()
    l = tok.shape[1] - 1
    hidden = out.hidden_states[n][:, :l]  # any [B, L, D] works: the same goes to both
    with torch.no_grad():
      # transformers positions the MTP inputs at i+1, we at i: RoPE attention is relative.
      h = mtp.forward_layer(
        0,
        hidden,
        torch.arange(1, l + 1)[None].expand(2, l),
        None,
        input_ids=torch.tensor(tok[:, 1:]),
      )
      want = mtp._project_to_logits(h).numpy()
    got, _, _ = jax.jit(ours.mtp_forward)(jnp.asarray(hidden.numpy()), jnp.asarray(tok))
    assert np.isfinite(want).all() and np.abs(want).max() > 0.5  # not a degenerate comparison
    np.testing.assert_allclose(np.asarray(got[0]), want, **TOL)


def test_our_exports_load_in_transformers(tmp_path):
  """dsv3_jax -> HF directory -> transformers: same logits (float32 and BF16 exports)."""
  _make_hf(str(tmp_path / "src"), seed=7, **CASES["yarn_qlora_groups_mtp"])
  ours = pretrained.from_pretrained(str(tmp_path / "src"), expert_block_size=8)
  assert ours.cfg.num_nextn_predict_layers == 1
  tok = _tokens(ours.cfg.vocab_size, seed=1)
  for dtype in ("float32", "bfloat16"):
    path = str(tmp_path / dtype)
    pretrained.save_pretrained(ours, path, dtype=dtype)
    theirs = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
      ref = theirs(torch.tensor(tok)).logits.numpy()
    # Our model re-read from the export holds the same (BF16-rounded) weights as theirs.
    again = pretrained.from_pretrained(path, expert_block_size=8)
    np.testing.assert_allclose(np.asarray(pretrained.logits(again, jnp.asarray(tok))), ref, **TOL)


def _reference_route(scores, bias, n_group, topk_group, k, fill):
  """DeepSeek's (fill=-inf) or older transformers' (fill=0) group-limited selection."""
  n, e = scores.shape
  choice = scores + bias
  group = np.sort(choice.reshape(n, n_group, -1), axis=-1)[..., -2:].sum(-1)
  keep = np.argsort(-group, axis=-1)[:, :topk_group]
  mask = np.zeros((n, n_group), bool)
  np.put_along_axis(mask, keep, True, axis=-1)
  masked = np.where(np.repeat(mask, e // n_group, axis=1), choice, fill)
  return np.sort(np.argsort(-masked, axis=-1)[:, :k], axis=-1)


def test_group_masking_neg_inf_vs_zero():
  """We mask dropped groups with -inf (DeepSeek's code). Masking with 0 (transformers before
  5.x) agrees while >= k positive `s + b` remain in the kept groups; with negative biases it
  picks experts of dropped groups. transformers 5.x masks with -inf too."""
  from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

  e, g, tg, k, d, n = 16, 4, 2, 4, 32, 64
  hf_cfg = DeepseekV3Config(
    **{
      **BASE,
      "hidden_size": d,
      "n_routed_experts": e,
      "n_group": g,
      "topk_group": tg,
      "num_experts_per_tok": k,
    }
  )
  cfg = ModelConfig(
    hidden_size=d, n_routed_experts=e, n_group=g, topk_group=tg, num_experts_per_tok=k
  ).validate()
  rng = np.random.RandomState(0)
  x = rng.randn(n, d).astype(np.float32)
  gate = (rng.randn(e, d) * 0.3).astype(np.float32)
  router = DeepseekV3TopkRouter(hf_cfg)
  for bias, agree in ((rng.uniform(0.05, 0.3, e), True), (rng.uniform(-1.5, -1.0, e), False)):
    bias = bias.astype(np.float32)
    scores = 1 / (1 + np.exp(-(x @ gate.T).astype(np.float64)))
    neg_inf = _reference_route(scores, bias, g, tg, k, -np.inf)
    zero = _reference_route(scores, bias, g, tg, k, 0.0)
    routing = routing_lib.route(jnp.asarray(x), jnp.asarray(gate.T), jnp.asarray(bias), cfg)
    ours = np.sort(np.asarray(routing.experts_Nxk), axis=-1)
    np.testing.assert_array_equal(ours, neg_inf)
    assert np.array_equal(zero, neg_inf) == agree
    with torch.no_grad():
      router.weight.copy_(torch.tensor(gate))
      router.e_score_correction_bias.copy_(torch.tensor(bias))
      _, w_hf, idx_hf = router(torch.tensor(x))
    theirs = np.sort(idx_hf.numpy(), axis=-1)
    assert np.array_equal(theirs, neg_inf) or np.array_equal(theirs, zero)
    if agree:
      np.testing.assert_array_equal(theirs, ours)
      order_hf = np.argsort(idx_hf.numpy(), axis=-1)
      order_ours = np.argsort(np.asarray(routing.experts_Nxk), axis=-1)
      w_ours = np.take_along_axis(np.asarray(routing.weights_Nxk), order_ours, -1)
      np.testing.assert_allclose(w_ours, np.take_along_axis(w_hf.numpy(), order_hf, -1), rtol=1e-5)
