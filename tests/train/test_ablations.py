"""The ablation harness (`benchmarks/ablations.py`): noise-floor arithmetic, traffic counts,
summaries and the README table from arm files, and each ablation end to end in a tiny setting
(finished arms skipped by a rerun)."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import ablations


def test_versus_floor_arithmetic():
  r = ablations.versus_floor(2.0, 2.01, 1.98)
  assert r["rel_gap"] == pytest.approx(0.005)
  assert r["noise_floor"] == pytest.approx(0.01)
  assert r["gap_over_floor"] == pytest.approx(0.5)
  assert not r["resolved"]  # a 0.5% gap inside a 1% spread says nothing
  r = ablations.versus_floor(2.0, 1.9, 2.02)
  assert r["rel_gap"] == pytest.approx(-0.05) and r["resolved"]
  assert r["gap_over_floor"] == pytest.approx(5.0)
  # The floor is the farthest rerun: a 1.5% gap that beats the first rerun's 0.5% alone is
  # inside the 2% of the second.
  several = ablations.versus_floor(2.0, 2.03, [2.01, 1.96])
  assert several["noise_floor"] == pytest.approx(0.02) and not several["resolved"]
  same = ablations.versus_floor(2.0, 2.0, 2.0)
  assert same["noise_floor"] == 0 and not same["resolved"] and math.isinf(same["gap_over_floor"])
  with pytest.raises(ValueError, match="baseline loss must be positive"):
    ablations.versus_floor(0.0, 1.0, 1.0)


def test_group_traffic_counts():
  # 16 experts in 8 groups of 2. Token 0 lives on group 0 and reaches groups 0, 1, 2 (experts
  # 0, 1, 2, 4): 3 groups, 2 remote ones, 2 remote copies. Token 1 lives on group 3 and sends
  # all 4 copies to group 7 (experts 14, 15 twice).
  experts = jnp.array([[0, 1, 2, 4], [14, 15, 14, 15]], jnp.int32)
  home = jnp.array([0, 3], jnp.int32)
  t = {k: float(v) for k, v in ablations.group_traffic(experts, home, 8, 16).items()}
  assert t == {
    "groups_reached": 4.0,
    "remote_groups": 3.0,
    "remote_copies": 6.0,
    "token_layers": 2.0,
  }


def _fake_arm(out, ablation, arm, loss, max_vio, steps=10, **extra):
  rec = {
    "steps": steps,
    "final_heldout_loss": loss,
    "heldout": {"0": {"loss": 5.0}, str(steps): {"loss": loss, **extra}},
    "curves": {"max_vio": [[max_vio, max_vio]] * steps},
    "step_time_s": 0.1,
    "wall_s": 1.0,
    "data_seed": 0,
    "tail_load": [[1.0, 3.0], [2.0, 2.0]],
  }
  path = os.path.join(out, ablation, "arms", f"{arm}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(rec, f)


def test_summary_table_and_readme(tmp_path):
  out = str(tmp_path)
  for arm, loss, vio in [("aux_free", 2.0, 0.2), ("aux_loss", 2.1, 0.5), ("none", 2.004, 1.5)]:
    _fake_arm(out, "balance", arm, loss, vio)
  _fake_arm(out, "balance", "noise_floor", 2.01, 0.25)
  partial = ablations.summarize("balance", out)
  assert partial["arms_missing"] == ["noise_floor_2"] and not partial["comparisons"]
  assert partial["verdict"].startswith("incomplete")
  _fake_arm(out, "balance", "noise_floor_2", 1.995, 0.18)
  r = ablations.summarize("balance", out)
  c = r["comparisons"]
  assert c["aux_loss"]["rel_gap"] == pytest.approx(0.05) and c["aux_loss"]["resolved"]
  assert c["none"]["noise_floor"] == pytest.approx(0.005) and not c["none"]["resolved"]
  assert c["aux_loss"]["max_vio_train_tail"] == pytest.approx((0.2, 0.5))
  assert c["aux_loss"]["max_vio_noise_floor"] == pytest.approx(0.05)
  assert r["baseline_runs"]["final_heldout_losses"] == [2.0, 2.01, 1.995]
  assert "aux-free 0.200" in r["verdict"] and "aux-loss 0.500" in r["verdict"]
  table = ablations.readme_table([r])
  assert (
    "| balance (§4.5.2-4.5.3, Table 5, Fig. 9) | aux_loss vs aux_free | 2.0000 -> 2.1000 |" in table
  )
  assert "+5.00% | 0.50% | MaxVio_batch 0.200 -> 0.500 (floor 0.050)" in table
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{ablations.README_BEGIN}\nold\n{ablations.README_END}\nrest\n")
  assert ablations.update_readme(str(readme), table)
  text = readme.read_text()
  assert "old" not in text and table in text and text.endswith("rest\n")
  assert not ablations.update_readme(str(readme), table)  # unchanged
  readme.write_text("no markers")
  with pytest.raises(ValueError, match="markers"):
    ablations.update_readme(str(readme), table)
  with pytest.raises(ValueError, match="unknown ablation 'nope'"):
    ablations.run("nope", out)
  with pytest.raises(ValueError, match="has no arm 'fp16'"):
    ablations.run("fp8", out, arms=["fp16"])


@pytest.fixture(scope="module")
def corpus():
  from dsv3_jax.train.loop import load_corpus

  return load_corpus(ablations.ablation_config(quick=True))


def _run(name, out, corpus, **kw):
  logs = []
  r = ablations.run(
    name, out, ablations.ablation_config(quick=True), corpus=corpus, log=logs.append, **kw
  )
  return r, logs


def test_finished_arms_are_skipped_and_shared(tmp_path, corpus, monkeypatch):
  """One arm (the default suite's share of the end-to-end test below, which is slow). The
  BF16 arm's gradient check against FP32 and FP8 (six compiled gradients, over half of this
  test's time) is the end-to-end test's to check; here it records a marker."""
  monkeypatch.setattr(ablations, "_fp8_gradient_check", lambda *a: {"checked": True})
  out = str(tmp_path)
  r, logs = _run("fp8", out, corpus, arms=["bf16"])
  assert len(logs) == 1 and "bf16: held-out" in logs[0], logs
  assert r["arms_missing"] and set(r["arms"]) == {"bf16"}
  assert set(r["arms"]["bf16"]["heldout"]) == {"0", "4", "8"}
  assert r["arms"]["bf16"]["gradient_agreement"] == {"checked": True}
  again, logs = _run("fp8", out, corpus, arms=["bf16"])
  assert len(logs) == 1 and "done earlier" in logs[0]
  assert again["arms"]["bf16"]["heldout"] == r["arms"]["bf16"]["heldout"]
  # Another ablation's identical arm (the shared baseline) is copied, not retrained.
  _, logs = _run("mtp", out, corpus, arms=["mtp1"])
  assert logs == ["mtp/mtp1: the same run as fp8/bf16"]


def test_gradient_agreement_sees_rounding_not_another_gradient():
  """The BF16 arm's check (`gradient_agreement`) on the quick model at its initial weights:
  FP32 against itself agrees exactly, BF16 dots differ by rounding only."""
  from dsv3_jax.parallel import mesh as mesh_lib
  from dsv3_jax.train.step import Trainer

  cfg = ablations.ablation_config(quick=True)
  init = Trainer(cfg, mesh_lib.make_mesh(cfg.parallel)).init()
  shape = (cfg.train.global_batch, cfg.train.seq_len + 1)
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, shape).astype(np.int32)
  g = ablations.gradient_agreement(
    cfg, init.params, init.biases, {"tokens": tokens}, precisions=("fp32", "bf16")
  )
  assert g["fp32"]["global_rel_error"] == 0 and g["fp32"]["cosine"] == pytest.approx(1)
  assert 0 < g["bf16"]["global_rel_error"] < 0.2 and g["bf16"]["cosine"] > 0.98, g["bf16"]
  assert len(g["bf16"]["worst_params"]) == 5


@pytest.mark.slow
def test_fp8_ablation_end_to_end_and_resume(tmp_path, corpus):
  out = str(tmp_path)
  r, _ = _run("fp8", out, corpus)
  assert not r["arms_missing"] and set(r["comparisons"]) == {"fp8", "fp32"}
  for arm in ("bf16", "fp8", "fp32", "noise_floor", "noise_floor_2"):
    assert os.path.exists(os.path.join(out, "fp8", "arms", f"{arm}.json"))
    assert set(r["arms"][arm]["heldout"]) == {"0", "4", "8"}
  assert r["arms"]["noise_floor"]["data_seed"] == 1 and r["arms"]["noise_floor_2"]["data_seed"] == 2
  # Same init, same batches: the three precisions start at the same held-out loss.
  starts = {a: e["heldout"]["0"] for a, e in r["arms"].items()}
  assert max(starts.values()) - min(starts.values()) < 2e-3, starts
  # The gradients of BF16 and FP8 dots against FP32's: rounding, not a different computation.
  g = r["arms"]["bf16"]["gradient_agreement"]
  for where in ("train_batch", "trained_heldout_batch"):
    assert g[where]["bf16"]["global_rel_error"] < g[where]["fp8"]["global_rel_error"] < 0.2
    assert g[where]["fp8"]["cosine"] > 0.98
  with open(os.path.join(out, "fp8", "results.json")) as f:
    assert json.load(f)["verdict"] == r["verdict"]
  # A rerun skips every finished arm; a changed setting reruns only what it changes.
  again, logs = _run("fp8", out, corpus)
  assert len(logs) == 5 and all("done earlier" in line for line in logs)
  assert again["comparisons"]["fp8"]["rel_gap"] == r["comparisons"]["fp8"]["rel_gap"]
  _, logs = _run("fp8", out, corpus, arms=["noise_floor"], data_seed=5)
  assert len(logs) == 1 and "noise_floor: held-out" in logs[0]
  # Another ablation's identical arm (the shared baseline) is copied, not retrained.
  _, logs = _run("mtp", out, corpus, arms=["mtp1"])
  assert logs == ["mtp/mtp1: the same run as fp8/bf16"]
  pytest.importorskip("matplotlib")
  ablations.plot(r, os.path.join(out, "fp8.png"))
  assert os.path.getsize(os.path.join(out, "fp8.png")) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["balance", "mtp", "node_limit"])
def test_ablation_end_to_end(tmp_path, corpus, name):
  r, _ = _run(name, str(tmp_path), corpus)
  assert not r["arms_missing"] and r["verdict"] and not r["verdict"].startswith("incomplete")
  arms = r["arms"]
  if name == "balance":
    assert len(arms["aux_free"]["max_vio_train"]) == 8
    assert np.asarray(arms["aux_free"]["tail_load"]).shape == (2, 16)  # 1 MoE layer + MTP
  if name == "mtp":
    assert len(arms["mtp0"]["tail_load"]) == 1 and len(arms["mtp1"]["tail_load"]) == 2
  if name == "node_limit":
    # M = 4 of 8 groups: never more than 4 nodes per token; free routing of 6 experts may
    # reach up to 6.
    assert 1 <= arms["limited_m4"]["heldout_nodes_per_token"] <= 4
    assert arms["unlimited"]["heldout_nodes_per_token"] <= 6
  pytest.importorskip("matplotlib")
  ablations.plot(r, str(tmp_path / "plot.png"))
