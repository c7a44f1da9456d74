"""Config validation: every invalid value names its field and rule."""

import pytest
from absl.testing import parameterized

from configs import dsv3
from dsv3_jax import config as config_lib
from dsv3_jax.checkpoint.hf_config import from_hf_config, to_hf_config


def _cfg(variant="tiny", **sections):
  cd = dsv3.get_config(variant)
  for section, updates in sections.items():
    for k, v in updates.items():
      cd[section][k] = v
  return cd


@pytest.mark.parametrize("variant", sorted(dsv3.VARIANTS))
def test_variants_validate(variant):
  cfg = config_lib.from_dict(dsv3.get_config(variant))
  assert isinstance(cfg.model, config_lib.ModelConfig)


INVALID = [
  ("topk_group_gt_n_group", "model", {"topk_group": 8, "n_group": 4}, "model.topk_group"),
  (
    "experts_not_divisible",
    "model",
    {"n_routed_experts": 10, "n_group": 4},
    "model.n_routed_experts",
  ),
  ("odd_rope_dim", "model", {"qk_rope_head_dim": 7}, "model.qk_rope_head_dim"),
  ("k_gt_experts", "model", {"num_experts_per_tok": 9}, "model.num_experts_per_tok"),
  (
    "too_few_experts_in_kept_groups",
    "model",
    {"num_experts_per_tok": 6, "topk_group": 2, "n_group": 4},
    "model.topk_group",
  ),
  ("dense_gt_layers", "model", {"first_k_dense_replace": 5}, "model.first_k_dense_replace"),
  ("bad_precision", "model", {"matmul_precision": "int4"}, "model.matmul_precision"),
  ("bad_dtype", "model", {"dtype": "float16"}, "model.dtype"),
  ("negative_width", "model", {"hidden_size": -1}, "model.hidden_size"),
  ("rope_factor_below_one", "model", {"rope_factor": 0.5}, "model.rope_factor"),
  ("bad_rope_scaling", "model", {"rope_scaling": "ntk"}, "model.rope_scaling"),
  # tiny is YaRN with factor 2: plain RoPE with a factor left over is a mistake, not a choice.
  ("factor_without_yarn", "model", {"rope_scaling": "none"}, "model.rope_factor"),
  ("yarn_without_factor", "model", {"rope_factor": 1.0}, "model.rope_factor"),
  ("zero_steps", "train", {"steps": 0}, "train.steps"),
  ("bad_b2", "train", {"b2": 1.0}, "train.b2"),
  ("bad_moment_dtype", "train", {"moment_dtype": "int8"}, "train.moment_dtype"),
  ("negative_logits_chunk", "train", {"logits_chunk": -1}, "train.logits_chunk"),
  ("heldout_fraction", "data", {"heldout_fraction": 1.5}, "data.heldout_fraction"),
  ("split_seed", "data", {"split_seed": -1}, "data.split_seed"),
  ("pipeline_kind", "parallel", {"pipeline": "gpipe2"}, "parallel.pipeline"),
  ("two_fill_axes", "parallel", {"data": -1, "expert": -1}, "parallel.data"),
]


class InvalidConfigTest(parameterized.TestCase):
  @parameterized.named_parameters(*INVALID)
  def test_raises_naming_field(self, section, updates, field):
    with self.assertRaisesRegex(ValueError, field.replace(".", r"\.")):
      config_lib.from_dict(_cfg(**{section: updates}))

  def test_seq_len_beyond_context(self):
    with self.assertRaisesRegex(ValueError, r"train\.seq_len"):
      config_lib.from_dict(_cfg(train={"seq_len": 4096}))

  def test_unknown_field(self):
    values = config_lib.to_dict(config_lib.from_dict(_cfg()))
    values["model"]["n_experts"] = 3
    with self.assertRaisesRegex(ValueError, r"model\.n_experts"):
      config_lib.from_dict(values)

  def test_hf_round_trip(self):
    cfg = config_lib.from_dict(dsv3.get_config("671b")).model
    hf = to_hf_config(cfg)
    self.assertEqual(
      (hf["rope_scaling"]["rope_type"], hf["rope_scaling"]["factor"]), ("yarn", 40.0)
    )
    back = from_hf_config(
      hf,
      dtype=cfg.dtype,
      matmul_precision=cfg.matmul_precision,
      expert_block_size=cfg.expert_block_size,
    )
    self.assertEqual(back, cfg)

  def test_pretrain_preset_exports_plain_rope(self):
    cfg = config_lib.from_dict(dsv3.get_config("671b_pretrain")).model
    hf = to_hf_config(cfg)
    self.assertIsNone(hf["rope_scaling"])
    back = from_hf_config(
      hf,
      dtype=cfg.dtype,
      matmul_precision=cfg.matmul_precision,
      expert_block_size=cfg.expert_block_size,
    )
    self.assertEqual(back, cfg)
