r"""The report's ablations in miniature, each difference beside a noise floor.

  python -m experiments.ablate --ablation=fp8          # FP8 vs BF16 (and FP32)     §3.3
  python -m experiments.ablate --ablation=balance      # aux-loss-free vs aux loss  §4.5.2
  python -m experiments.ablate --ablation=mtp          # MTP depth 1 vs 0           §4.5.1
  python -m experiments.ablate --ablation=node_limit   # M=4 of 8 groups vs free    §2.1.2
  python -m experiments.ablate --ablation=all
  python -m experiments.ablate --readme                # README table from the JSONs
  python -m experiments.ablate --ablation=fp8 --quick --out=/tmp/abl   # a tiny smoke run

Every arm trains the same model from the same init on the same batches; a `noise_floor` arm
reruns the baseline with another data order. Arms are saved when they finish
(`<out>/<ablation>/arms/<arm>.json`) and skipped by a rerun with the same settings, so an
interrupted ablation resumes. Writes `<out>/<ablation>/results.json` and `loss.png`, and prints
each comparison next to its noise floor. `--config.<section>.<field>=value` overrides the
shared model (default `benchmarks.ablations.ablation_config()`; ~6 minutes per arm on 2 cores).
The harness is `benchmarks/ablations.py`.
"""

import os
import sys

import ml_collections
from absl import app, flags

from benchmarks import ablations
from dsv3_jax import config as config_lib
from experiments import common

_DEFAULT = config_lib.to_dict(ablations.ablation_config())
_CONFIG = common.define_config_dict(
  "config",
  ml_collections.ConfigDict(_DEFAULT),
  "The shared model/train/data config of every arm (default: ablation_config()).",
)
_ABLATION = flags.DEFINE_enum(
  "ablation", "all", ["all", *ablations.ABLATIONS], "Which ablation to run."
)
_ARMS = flags.DEFINE_list("arms", [], "Run only these arms (default: every missing arm).")
_OUT = flags.DEFINE_string("out", "runs/ablations", "Results folder (one subfolder per ablation).")
_SEED = flags.DEFINE_integer("data_seed", 0, "The baseline's data order (noise floor: +1).")
_QUICK = flags.DEFINE_bool(
  "quick", False, "A tiny model and a few steps (smoke runs, notebooks; no --config overrides)."
)
_README = flags.DEFINE_bool(
  "readme", False, "Only rewrite README.md's ablation table from the results in --out."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  if _README.value:
    results = ablations.load_results(_OUT.value)
    if not results:
      raise app.UsageError(f"no ablation results under {_OUT.value}; run an ablation first")
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    changed = ablations.update_readme(readme, ablations.readme_table(results))
    print(f"{'updated' if changed else 'unchanged'}: {readme}")
    return
  names = list(ablations.ABLATIONS) if _ABLATION.value == "all" else [_ABLATION.value]
  overridden = _CONFIG.value.to_dict() != _DEFAULT
  if _QUICK.value and overridden:
    raise app.UsageError("--quick picks its own tiny config: drop the --config overrides")
  base = (
    ablations.ablation_config(quick=True) if _QUICK.value else config_lib.from_dict(_CONFIG.value)
  )
  for name in names:
    try:
      result = ablations.run(
        name, _OUT.value, base, arms=_ARMS.value, data_seed=_SEED.value, progress=True
      )
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    ablations.plot(result, os.path.join(_OUT.value, name, "loss.png"))
    print(ablations.report(result))


if __name__ == "__main__":
  sys.exit(app.run(main))
