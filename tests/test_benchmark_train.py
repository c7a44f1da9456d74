"""The train benchmark's timing (`benchmarks/train_step.py`): each side's step time is the
median of its timed steps, every step is recorded, and the table carries the spread."""

import statistics

import pytest

from benchmarks import train_step


def test_step_times_time_each_call_after_one_warm_up():
  calls = []
  times = train_step.step_times(lambda: calls.append(len(calls)), 3)
  assert calls == [0, 1, 2, 3]  # the warm-up, then one call per timed step
  assert len(times) == 3
  assert all(t >= 0 for t in times)


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
