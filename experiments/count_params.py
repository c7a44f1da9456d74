r"""Counts a config's parameters without allocating them.

  python -m experiments.count_params --config=configs/dsv3.py:671b

Builds the model abstractly (`nnx.eval_shape`: ShapeDtypeStructs only), counts the real
parameter tensors, and cross-checks them against the analytic formula in
`dsv3_jax.counts.param_counts`. Prints billions with a `B` suffix.
"""

import json
import sys

from absl import app, flags

from experiments import common

_CONFIG = common.define_config_file("config", "configs/dsv3.py:671b", "Model config.")
_JSON = flags.DEFINE_string("json", "", "Also write the counts to this JSON file.")


def count(model_cfg) -> dict:
  import jax
  from flax import nnx

  from dsv3_jax import model as model_lib
  from dsv3_jax.counts import param_counts

  abstract = model_lib.abstract(model_cfg)
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  size = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  total_tensors = size(params)
  mtp_tensors = size(params.get("mtp", {}))
  analytic = param_counts(model_cfg)
  main = total_tensors - mtp_tensors
  if main != analytic["total"] or mtp_tensors != analytic["mtp_unique"]:
    raise AssertionError(f"tensor count {main}/{mtp_tensors} != formula {analytic}")
  embed = model_cfg.vocab_size * model_cfg.hidden_size
  return {
    "main": main,
    "activated": analytic["activated"],
    "activated_excl_embedding": analytic["activated"] - embed,
    "mtp_unique": mtp_tensors,
    "mtp_with_shared_embedding_and_head": analytic["mtp_with_shared"],
    "main_plus_mtp": main + mtp_tensors,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  from dsv3_jax import config as config_lib

  cfg = config_lib.from_dict(_CONFIG.value).model
  counts = count(cfg)
  labels = {
    "main": "main model",
    "activated": "activated per token",
    "activated_excl_embedding": "activated per token, without the embedding lookup",
    "mtp_unique": "MTP modules (unique tensors)",
    "mtp_with_shared_embedding_and_head": "MTP modules incl. shared embedding + head",
    "main_plus_mtp": "main + MTP (as hosted)",
  }
  for key, label in labels.items():
    print(f"{label:<52} {counts[key] / 1e9:9.2f}B  ({counts[key]:,})")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(counts, f, indent=1)


if __name__ == "__main__":
  sys.exit(app.run(main))
