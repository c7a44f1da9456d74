"""Test-wide setup: 8 emulated CPU devices and strict JAX flags.

The device count must be fixed before jax is first imported, so it is set here,
at collection time, ahead of every test module.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Compiling, not running, is most of this suite's time (tiny models, hundreds of programs):
# LLVM's optimisation level 0 compiles them faster (the whole suite ~17% faster on 2 cores).
# It changes how the CPU code is generated, not the HLO program, so buffer sizes and
# `memory_analysis()` stay XLA's own, and values up to float rounding (LLVM may fuse fewer
# multiply-adds); the tolerances hold. An XLA_FLAGS that sets a level keeps it.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)

# Identical programs (the same tiny train step in several tests) compile once per session
# (per pytest worker under `make test`'s two).
import tempfile  # noqa: E402

jax.config.update(
  "jax_compilation_cache_dir",
  os.environ.get("DSV3_TEST_CACHE", tempfile.mkdtemp(prefix="jax_cache_")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Float32 means float32 on every backend (GPUs default to TF32-like dots), so the tight
# tolerances against numpy references hold wherever the suite runs.
jax.config.update("jax_default_matmul_precision", "highest")
