"""The train benchmark's timing (`benchmarks/train_step.py`): each side's step time is the
median of its timed steps, every step is recorded, and the table carries the spread."""

import statistics

import pytest

from benchmarks import train_step


def test_timed_rounds_interleave_after_one_warm_up_each():
  calls = []
  fns = {name: (lambda name=name: calls.append(name)) for name in ("ours", "peer")}
  times = train_step.timed_rounds(fns, 3)
  assert calls == ["ours", "peer"] * 4  # warm-ups, then one call of each per round
  assert {k: len(v) for k, v in times.items()} == {"ours": 3, "peer": 3}
  assert all(t >= 0 for v in times.values() for t in v)


def test_tiny_run_reports_median_steps():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  result = train_step.run("tiny", batch=2, seq_len=16, steps=3, peer=True)
  sides = ["dsv3_jax", "dsv3_jax_without_mtp", "hf_transformers"]
  for side in sides:
    row = result[side]
    assert len(row["step_times_s"]) == 3
    assert row["step_s"] == statistics.median(row["step_times_s"])
    assert row["tokens_per_s"] == pytest.approx(2 * 16 / row["step_s"])
  assert result["hf_transformers"]["experts_implementation"] == train_step.HF_EXPERTS
  assert result["speedup_vs_hf"] == pytest.approx(
    result["hf_transformers"]["step_s"] / result["dsv3_jax"]["step_s"]
  )
  table = train_step.report(result)
  assert "speed-up vs HF" in table and table.count("steps ") == 2  # ours' and HF's spread
