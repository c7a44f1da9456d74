"""The decode benchmark's breakdown of a prefill (`benchmarks/decode.py`): every layer kind is
timed, the parts add up, and the printed table carries them."""

import dataclasses

from benchmarks import decode
from configs import dsv3
from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib


def test_prefill_parts_cover_every_layer_kind_and_print():
  cfg = config_lib.from_dict(dsv3.get_config("tiny")).model
  model = model_lib.create(dataclasses.replace(cfg, num_nextn_predict_layers=0), seed=0)
  assert cfg.n_dense_layers >= 1 and cfg.n_moe_layers >= 1
  parts = decode.prefill_parts(model, batch=2, length=32)
  assert set(parts) == {
    "attention (dense layers)",
    "mlp",
    "attention (moe layers)",
    "moe",
    "embedding + head",
    "sum",
  }
  assert all(t > 0 for t in parts.values())
  assert abs(parts["sum"] - sum(t for k, t in parts.items() if k != "sum")) < 1e-12

  result = {
    "config": "tiny",
    "cpu_count": 2,
    "device": "cpu",
    "host_memory": {
      "transparent_huge_pages": "never",
      "glibc_tunables": "",
      "malloc_huge_pages": False,
    },
    "memory_bandwidth_bytes_per_s": 1e10,
    "settings": {"decode_batches": [], "prefill_batch": 2, "prefill_len": 32},
    "dsv3_jax": {
      "prefill_tokens_per_s": 64 / parts["sum"],
      "cache_bytes_per_token": 240,
      "prefill_parts_s": parts,
    },
  }
  text = decode.report(result)
  assert "prefill, where the time goes" in text
  assert all(name in text for name in parts)
