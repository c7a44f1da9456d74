"""`--config.<section>.<field>` overrides of missing fields fail with a message naming them."""

import os
import subprocess
import sys

import pytest

from configs import dsv3
from dsv3_jax import overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_override_paths_reads_every_form():
  argv = [
    "--config=configs/dsv3.py:tiny",
    "--config.train.steps=4",
    "-config.model.dtype",
    "bfloat16",
    "--noconfig.train.flag",
    "--workdir=/tmp/x",
    "--",
    "--config.not.this=1",
  ]
  assert overrides.override_paths(argv) == ["train.steps", "model.dtype", "train.flag"]


def test_existing_fields_pass():
  config = dsv3.get_config("tiny")
  overrides.check_argv(
    config, ["--config.train.steps=4", "--config.model.hidden_size=64", "--config.parallel.data=2"]
  )


def test_missing_field_names_it_and_close_matches():
  config = dsv3.get_config("tiny")
  with pytest.raises(ValueError) as e:
    overrides.check_argv(config, ["--config.train.steps=4", "--config.train.batch_size=4"])
  msg = str(e.value)
  assert "--config.train.batch_size" in msg and "`batch_size`" in msg
  assert "did you mean" in msg and "`global_batch`" in msg.split("(fields")[0]
  assert "seq_len" in msg  # the section's fields are listed


def test_missing_section_and_leaf_used_as_section():
  config = dsv3.get_config("tiny")
  with pytest.raises(ValueError, match=r"the config has no field `trian`; did you mean `train`"):
    overrides.check_argv(config, ["--config.trian.steps=4"])
  with pytest.raises(ValueError, match=r"`train.steps` is a field, not a section"):
    overrides.check_path(config, "train.steps.x")


def test_close_matches_by_spelling_and_by_shared_part():
  fields = ["global_batch", "seq_len", "steps", "eval_batches", "learning_rate"]
  assert overrides.close_matches("stpes", fields)[0] == "steps"
  assert "global_batch" in overrides.close_matches("batch_size", fields)
  assert overrides.close_matches("zzz", fields) == []


def test_binary_reports_a_bad_override_without_a_traceback():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [
    sys.executable,
    "-m",
    "experiments.count_params",
    "--config=configs/dsv3.py:tiny",
    "--config.train.batch_size=4",
  ]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1, out.stderr
  assert "Traceback" not in out.stderr, out.stderr
  assert "`batch_size`" in out.stderr and "`global_batch`" in out.stderr, out.stderr
