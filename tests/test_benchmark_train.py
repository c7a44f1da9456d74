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
  """Ours beside the peer; the bf16 and fp8 rows are the slow test below's (each compiles
  the step again)."""
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
  assert "fp8_over_bf16_step" not in result  # no ratio claimed without both precision rows
  # The backward timed apart from the differentiated forward it reads the residuals of.
  ours = result["dsv3_jax"]
  assert ours["training_forward_s"] > 0 and ours["backward_s"] > 0
  assert ours["backward_over_forward"] == pytest.approx(
    ours["backward_s"] / ours["training_forward_s"]
  )
  table = train_step.report(result)
  assert "backward / forward" in table and "fp8 / bf16" not in table
  assert "speed-up vs HF" in table and table.count("steps ") == 2  # ours' and HF's spread
  # One profiled step of ours, by part: every part of the tiny model ran and took time.
  parts = result["dsv3_jax"]["time_by_part_s"]
  for name in ("attention", "MoE", "dense MLP", "embedding, norms, head, loss"):
    assert parts[f"{name} forward"] > 0 and parts[f"{name} backward"] > 0, parts
  assert parts["optimizer and metrics"] > 0
  assert "where our step's time goes" in table and "attention backward" in table


@pytest.mark.slow  # two more compiles of the step, the fp8 one the longest
def test_precision_rows_and_their_step_time_ratio():
  result = train_step.run(
    "tiny", batch=2, seq_len=16, steps=3, peer=False, precisions=("bf16", "fp8")
  )
  for precision in ("bf16", "fp8"):
    row = result[f"dsv3_jax_{precision}"]
    assert len(row["step_times_s"]) == 3 and row["step_s"] > 0
  assert result["fp8_over_bf16_step"] == pytest.approx(
    result["dsv3_jax_fp8"]["step_s"] / result["dsv3_jax_bf16"]["step_s"]
  )
  table = train_step.report(result)
  assert "fp8 / bf16 step time" in table and "fp8 matmuls" in table and "bf16 matmuls" in table
  assert "speed-up vs HF" not in table


def test_time_by_part_files_instructions_by_scope_and_phase():
  from benchmarks import profile

  hlo = "\n".join(
    [
      "HloModule jit_step, entry_computation_layout={()->f32[]}",
      '  %fusion.1 = f32[4,8]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%f1, metadata={op_name="jit(f)/jvp()/while/body/closed_call/attention/dot_general"}',
      '  %dot.2 = f32[4,8]{1,0} dot(%a, %b), metadata={op_name="jit(f)/transpose(jvp())/closed_call/moe/dot_general"}',
      '  %ynn.3 = f32[4,8]{1,0} fusion(%a), kind=kCustom, metadata={op_name="jit(f)/transpose(jvp())/closed_call/moe/cond/branch_1_fun/overflow/while/body/dot_general"}',
      # The expert-parallel dispatch's fast/fallback cond: MoE, not the kernel's overflow pass.
      '  %fusion.13 = f32[4,8]{1,0} fusion(%a), kind=kLoop, metadata={op_name="jit(f)/jvp()/closed_call/moe/shard_map/cond/branch_0_fun/dot_general"}',
      '  %while.4 = (s32[], f32[4,8]{1,0}) while(%t), condition=%c, body=%b, metadata={op_name="jit(f)/jvp()/closed_call/moe/while"}',
      '  ROOT %add.5 = f32[] add(%x, %y), metadata={op_name="jit(f)/add"}',
      "  %copy.6 = f32[4,8]{1,0} copy(%z)",
      # Unrolled layers (`unroll_layers`): the scope is wrapped by the transformation.
      '  %fusion.7 = f32[4,8]{1,0} fusion(%a), kind=kLoop, metadata={op_name="jit(f)/jvp(attention)/bhlq,bhtq->bhlt/dot_general"}',
      '  %fusion.8 = f32[4,8]{1,0} fusion(%a), kind=kLoop, metadata={op_name="jit(f)/transpose(jvp(moe))/dot_general"}',
      '  %fusion.9 = f32[4,8]{1,0} fusion(%a), kind=kLoop, metadata={op_name="jit(f)/transpose(jvp(moe))/cond/branch_1_fun/overflow/add"}',
      '  %fusion.10 = f32[4,8]{1,0} fusion(%a), kind=kLoop, metadata={op_name="jit(f)/jvp(mlp)/jit(silu)/mul"}',
      # Outside every scope: the loss's own ops, and a name that only contains "moe".
      '  %fusion.11 = f32[4,8]{1,0} fusion(%a), kind=kLoop, metadata={op_name="jit(f)/jvp(jit(log_softmax))/reduce_max"}',
      '  %fusion.12 = f32[4,8]{1,0} fusion(%a), kind=kLoop, metadata={op_name="jit(f)/jvp()/moe_bias/add"}',
    ]
  )
  ops = profile.instructions(hlo)
  assert ops["while.4"][0] == "while" and ops["dot.2"][0] == "dot" and ops["add.5"][0] == "add"
  assert [profile.part(ops[n][1]) for n in ("fusion.1", "dot.2", "ynn.3", "add.5", "copy.6")] == [
    "attention forward",
    "MoE backward",
    "routed experts, overflow pass backward",
    "optimizer and metrics",
    "unattributed (instructions XLA added, e.g. copies)",
  ]
  assert profile.part(ops["fusion.13"][1]) == "MoE forward"
  unrolled = [profile.part(ops[f"fusion.{i}"][1]) for i in range(7, 13)]
  assert unrolled == [
    "attention forward",
    "MoE backward",
    "routed experts, overflow pass backward",
    "dense MLP forward",
    "embedding, norms, head, loss forward",
    "embedding, norms, head, loss forward",
  ]
