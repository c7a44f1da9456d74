"""Prefill and decode on separate meshes (DeepSeek-V3 report, arXiv 2412.19437 §3.4).

DeepSeek-V3 serves with the two stages on different machines: prefilling (compute-bound,
long sequences) on a unit of 4 nodes, decoding (memory-bound, one token per sequence) on 40,
each with its own parallel layout — attention data-parallel and the MoE layers expert-
parallel — so each stage runs at its own best batch and layout (§3.4.1, §3.4.2). What
crosses from one to the other is the request's KV cache; with MLA that is only the compressed
latent `c_kv` and the decoupled RoPE key `k_pe` of each layer (§2.1.1), a small fraction of
a full K/V cache.

`DisaggregatedGenerator` does this on two disjoint device sets of one host (e.g. 4 + 4 of 8
emulated CPU devices):

  prefill mesh   data x expert over the prefill devices; the model's parameters placed by the
                 sharding plan of that mesh (routed experts split over `expert`), the prompts'
                 batch over data x expert, the MoE layers through the all-to-all dispatch;
  hand-off       the filled latent cache (and each sequence's first sampled token) moved to
                 the decode mesh's layout with `jax.device_put` — nothing else: `transfer`
                 counts the bytes and checks that the cache holds only c_kv and k_pe;
  decode mesh    the same on the decode devices, decoding every sequence with absorbed MLA
                 over the moved cache (the `inference/generate.py` loop); optionally with
                 redundant experts (an EPLB placement: hot experts replicated, replicas packed
                 over the decode mesh's expert axis), as the report's decoding deployment.

The tokens equal single-mesh generation's (same keys, same sampling).
"""

import dataclasses
import math
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax import config as config_lib
from dsv3_jax.inference.generate import Generation, Generator, SamplingConfig
from dsv3_jax.layers.mla import LatentCache
from dsv3_jax.parallel import mesh as mesh_lib
from dsv3_jax.parallel import sharding
from dsv3_jax.parallel.mesh import BATCH


@dataclasses.dataclass
class Side:
  """One stage's mesh, its sharding plan and a `Generator` whose weights live on it."""

  name: str
  mesh: jax.sharding.Mesh
  plan: sharding.ShardingPlan
  generator: Generator

  @property
  def batch_shards(self) -> int:
    return mesh_lib.batch_size_per_step(self.mesh)

  def cache_sharding(self, cache):
    """Each cache leaf [(layers,) batch, T, C]: the batch over data x expert, as the batch."""
    return jax.tree.map(
      lambda x: NamedSharding(self.mesh, P(*([None] * (x.ndim - 3)), BATCH, None, None)), cache
    )


@dataclasses.dataclass
class Transfer:
  cache_bytes: int  # c_kv + k_pe of every layer, every sequence, every position
  other_bytes: int  # the first sampled token of each sequence
  seconds: float


@dataclasses.dataclass
class DisaggregatedGeneration(Generation):
  transfer: Optional[Transfer] = None


def split_devices(devices: Sequence, n_prefill: int) -> tuple[list, list]:
  """The first `n_prefill` devices for prefilling, the rest for decoding (disjoint)."""
  devices = list(devices)
  if not 0 < n_prefill < len(devices):
    raise ValueError(
      f"n_prefill={n_prefill} must leave devices to both stages: give 0 < n_prefill < "
      f"{len(devices)} (the devices available)"
    )
  return devices[:n_prefill], devices[n_prefill:]


def _side(name, model, devices, expert: int, cache_dtype, vocab_limit, microbatches) -> Side:
  cfg = model.cfg
  n = len(devices)
  if expert < 1 or n % expert:
    raise ValueError(f"{name}: the expert axis ({expert}) must divide its {n} devices")
  parallel = config_lib.ParallelConfig(data=n // expert, expert=expert)
  mesh = mesh_lib.make_mesh(parallel, devices)
  plan = sharding.plan(config_lib.Config(model=cfg, parallel=parallel), mesh)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  placed = jax.device_put(nnx.to_pure_dict(params), plan.param_shardings(params))
  nnx.replace_by_pure_dict(params, placed)
  rest = jax.device_put(rest, plan.replicated)
  placed = nnx.merge(graphdef, params, rest)
  gen = Generator(
    placed,
    cache_dtype=cache_dtype,
    vocab_limit=vocab_limit,
    routed=plan.routed,
    microbatches=microbatches,
    batch_shards=mesh_lib.batch_size_per_step(mesh),
  )
  return Side(name, mesh, plan, gen)


def _default_expert(cfg, n_devices: int) -> int:
  """The widest expert axis that divides both the devices and the routed experts."""
  return math.gcd(n_devices, max(cfg.n_routed_experts, 1))


class DisaggregatedGenerator:
  """Prefill on `prefill_devices`, decode on `decode_devices` (disjoint device sets).

    prefill, decode = split_devices(jax.devices(), 4)
    gen = DisaggregatedGenerator(model, prefill, decode)
    result = gen.generate(prompts, SamplingConfig(max_new_tokens=32))
    result.tokens, result.transfer.cache_bytes

  Args:
    model: a `Transformer` (its weights are copied to both meshes).
    prefill_devices, decode_devices: the two device sets.
    prefill_expert, decode_expert: the `expert` axis of each mesh (the rest is `data`);
      default: the most devices that divide the routed experts.
    cache_dtype, vocab_limit, microbatches: as `Generator` (microbatches=2: the two-micro-
      batch overlap on both meshes).
    decode_placement: redundant experts on the decode mesh, as the report deploys them
      (§3.4.2): an EPLB placement (phy2log, log2phy, logcnt) from `eplb.rebalance_experts`
      with `num_gpus` = the decode mesh's expert axis; its physical experts are split over
      that axis.
  """

  def __init__(
    self,
    model,
    prefill_devices: Sequence,
    decode_devices: Sequence,
    *,
    prefill_expert: Optional[int] = None,
    decode_expert: Optional[int] = None,
    cache_dtype=jnp.bfloat16,
    vocab_limit: Optional[int] = None,
    microbatches: int = 1,
    decode_placement=None,
  ):
    overlap = set(prefill_devices) & set(decode_devices)
    if overlap:
      raise ValueError(f"prefill and decode devices must be disjoint; both hold {sorted(overlap)}")
    if not prefill_devices or not decode_devices:
      raise ValueError("both stages need at least one device")
    cfg = model.cfg
    self.cfg = cfg
    pe = prefill_expert or _default_expert(cfg, len(prefill_devices))
    de = decode_expert or _default_expert(cfg, len(decode_devices))
    args = (cache_dtype, vocab_limit, microbatches)
    self.prefill_side = _side("prefill", model, prefill_devices, pe, *args)
    decode_model = model
    if decode_placement is not None:
      from dsv3_jax.serving.eplb import with_redundant_experts

      decode_model = with_redundant_experts(model, decode_placement)
    self.decode_side = _side("decode", decode_model, decode_devices, de, *args)
    self.cache_dtype = jnp.dtype(cache_dtype)
    p = self.prefill_side
    self._init_cache = jax.jit(
      lambda b, t: nnx.merge(p.generator.graphdef, p.generator.state).init_cache(
        b, t, self.cache_dtype
      ),
      static_argnums=(0, 1),
    )

  def transfer(self, cache, first_B):
    """Moves the prefilled latent cache and the first tokens to the decode mesh."""
    leaves = jax.tree.leaves(cache, is_leaf=lambda x: isinstance(x, LatentCache))
    for leaf in leaves:
      if not isinstance(leaf, LatentCache):
        raise TypeError(f"the prefill cache holds a {type(leaf).__name__}, not a LatentCache")
    cache_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(cache))
    d = self.decode_side
    t0 = time.perf_counter()
    moved = jax.device_put(cache, d.cache_sharding(cache))
    first = jax.device_put(first_B, NamedSharding(d.mesh, P(BATCH)))
    jax.block_until_ready((moved, first))
    return moved, first, Transfer(cache_bytes, int(first_B.nbytes), time.perf_counter() - t0)

  def generate(
    self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig()
  ) -> DisaggregatedGeneration:
    p, d = self.prefill_side, self.decode_side
    multiple = math.lcm(p.batch_shards, d.batch_shards) * p.generator.microbatches
    prep = p.generator.prepare(prompts, sampling, batch_multiple=multiple)
    cache = self._init_cache(len(prep.tokens), prep.total)
    cache = jax.device_put(cache, p.cache_sharding(cache))
    t0 = time.perf_counter()
    first, cache = p.generator.prefill(prep, cache)
    first.block_until_ready()
    t1 = time.perf_counter()
    cache, first, moved = self.transfer(cache, first)
    t2 = time.perf_counter()
    out, steps = d.generator.decode(prep, cache, first)
    out = np.asarray(out)
    t3 = time.perf_counter()
    seqs, finished = Generator.collect(prep, out, steps)
    return DisaggregatedGeneration(
      seqs, finished, t1 - t0, t3 - t2, int(steps) * len(prompts), transfer=moved
    )
