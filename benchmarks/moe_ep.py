"""Expert-parallel MoE: node-limited routing's traffic, buffers and step time.

The body of `experiments/benchmark_moe.py` (see it for the flags). DeepSeek-V3 limits each
token to at most M nodes (node-limited routing, arXiv 2412.19437 §2.1.2) and sends a token
once per node over IB, fanning it out inside the node over NVLink (§3.2.2). Here the
`expert` axis spans all devices, `nodes` groups of consecutive EP ranks form "nodes" and the
router's n_group is set to the node count (one expert group per node), so `topk_group = M`
caps the nodes a token reaches. For node-limited routing (M = limit) and unlimited routing
(M = nodes), on the same weights and tokens, `run` reports:

  * cross-node copies per token: copies whose expert lives on another node (what a flat
    all_to_all of copies sends across nodes);
  * remote nodes per token: distinct other nodes a token reaches -- its cross-node traffic
    under DeepSeek-V3's dispatch, and the number M bounds;
  * bytes per token moved by dispatch + combine (all copies, and the cross-node part both
    ways), and the per-device size of the fixed all_to_all buffers (dropless bound vs a
    capacity factor, with the copies that factor drops);
  * step time (forward + backward) of the EP layer vs the single-device layer;

and the same routing statistics at DeepSeek-V3's own shape (256 experts, 8 per token, 8
groups on 8 nodes, M = 4) from the router alone. Inputs and router weights are random, so
routing is close to uniform; emulated devices share the host's cores, so step times measure
the overhead of EP, not a speed-up.
"""

import statistics
import time


def _time(fn, iters: int) -> float:
  import jax

  jax.block_until_ready(fn())  # warm-up / compile
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def routing_traffic(experts_Nxk, src_node_N, n_experts: int, n_nodes: int) -> dict:
  """Per-token node statistics of a routing (numpy), for tokens living on `src_node_N`."""
  import numpy as np

  node_Nxk = experts_Nxk // (n_experts // n_nodes)
  remote_Nxk = node_Nxk != src_node_N[:, None]
  reached_NxM = np.zeros((len(node_Nxk), n_nodes), bool)
  np.put_along_axis(reached_NxM, node_Nxk, True, axis=1)
  remote_nodes_N = reached_NxM.sum(1) - reached_NxM[np.arange(len(node_Nxk)), src_node_N]
  return {
    "cross_node_copies_per_token": float(remote_Nxk.sum(1).mean()),
    "remote_nodes_per_token": float(remote_nodes_N.mean()),
    "nodes_per_token_mean": float(reached_NxM.sum(1).mean()),
    "nodes_per_token_max": int(reached_NxM.sum(1).max()),
  }


def v3_shape_routing(n_tokens: int, limit: int, nodes: int = 8) -> dict:
  """Routing-only traffic at DeepSeek-V3's shape, node-limited (M=limit) vs unlimited."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import dsv3
  from dsv3_jax import config as config_lib
  from dsv3_jax.layers.routing import route
  from dsv3_jax.parallel import node_dispatch

  base = config_lib.from_dict({"model": dsv3.get_config("671b").model.to_dict()}).model
  d, e = base.hidden_size, base.n_routed_experts
  x = jax.random.normal(jax.random.key(0), (n_tokens, d), jnp.float32)
  gate = jax.random.normal(jax.random.key(1), (d, e), jnp.float32) * base.init_std
  bias = jnp.zeros((e,), jnp.float32)
  src_node_N = np.arange(n_tokens) % nodes
  out = {
    "n_routed_experts": e,
    "num_experts_per_tok": base.num_experts_per_tok,
    "n_group": base.n_group,
    "nodes": nodes,
    "tokens": n_tokens,
  }
  for name, m in (("node_limited", limit), ("unlimited", base.n_group)):
    cfg = config_lib.replace(config_lib.Config(model=base), model={"topk_group": m}).model
    experts = np.asarray(jax.jit(lambda x: route(x, gate, bias, cfg).experts_Nxk)(x))
    out[name] = {
      "topk_group": m,
      **routing_traffic(experts, src_node_N, e, nodes),
      # Flat vs two-stage (node, then GPU) dispatch; FP8 dispatch, BF16 combine.
      "cross_node_bytes": node_dispatch.cross_node_traffic(
        experts, src_node_N, e, nodes, hidden_size=d
      ),
    }
  out["two_stage"] = node_dispatch.traffic_ratios(
    out["node_limited"]["cross_node_bytes"], out["unlimited"]["cross_node_bytes"]
  )
  return out


def v3_dispatch_buffers(
  tokens_per_device: int = 4096,
  ep: int = 64,
  nodes: int = 8,
  limit: int = 4,
  layers: int = 4,
  dispatch_factor: float = 2.0,
) -> dict:
  """Dispatch buffer bytes per device vs the real copies at DeepSeek-V3's routing shape
  (256 experts, k=8, 8 groups on `nodes` nodes, M=`limit`, EP=`ep`), router only.

  Affinities are random logits per token (no hidden states or gate at this size); each EP
  rank sends its `tokens_per_device` tokens. For `layers` independent batches, counts the
  copies each (src, dst) rank pair carries: the fast buffer overflows (and every rank sends
  further rounds) when any pair exceeds its slots — the fallback rate. `two_stage`: the same
  for the two-stage dispatch on `nodes` nodes (tokens per node pair, copies per forwarder
  and rank) with its fast, fallback and worst-case send buffers.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import dsv3
  from dsv3_jax import config as config_lib
  from dsv3_jax.layers.routing import route
  from dsv3_jax.parallel import expert, node_dispatch
  from dsv3_jax.parallel.planner import abstract_mesh

  base = config_lib.from_dict({"model": dsv3.get_config("671b").model.to_dict()}).model
  cfg = config_lib.replace(config_lib.Config(model=base), model={"topk_group": limit}).model
  e, k, d = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
  setting = expert.ExpertParallel(
    abstract_mesh({"data": 1, "expert": ep, "pipe": 1}), dispatch_factor=dispatch_factor
  )
  sizes = expert.buffer_bytes(tokens_per_device, cfg, setting, itemsize=1)  # FP8 dispatch
  route_fn = jax.jit(
    lambda lg: (
      route(lg, jnp.eye(e, dtype=jnp.float32), jnp.zeros((e,), jnp.float32), cfg).experts_Nxk
    )
  )
  # The two-stage dispatch on the same routing: `nodes` nodes of ep / nodes ranks each.
  g = ep // nodes
  two_setting = expert.ExpertParallel(
    setting.mesh, ranks_per_node=g, dispatch_factor=dispatch_factor
  )
  two = node_dispatch.buffer_bytes(tokens_per_device, cfg, two_setting, itemsize=1)
  (f1, f2), max1, max2, two_fallbacks = two["fast_stage_slots"], 0, 0, 0
  fallbacks, max_pair = 0, 0
  for layer in range(layers):
    logits = jax.random.normal(jax.random.key(layer), (ep * tokens_per_device, e), jnp.float32)
    dst = np.asarray(route_fn(logits)) // (e // ep)  # [N, k] destination EP rank
    src = np.repeat(np.arange(ep), tokens_per_device * k)
    pair = np.bincount(src * ep + dst.reshape(-1), minlength=ep * ep)
    max_pair = max(max_pair, int(pair.max()))
    fallbacks += int(pair.max() > sizes["fast_slots_per_rank"])
    # Stage 1: tokens a rank sends to one node; stage 2: copies a forwarder (the node of the
    # destination, the source's local rank) sends to one rank of its node.
    to_node = np.zeros((ep * tokens_per_device, nodes), bool)
    np.put_along_axis(to_node, dst // g, True, axis=1)
    load1 = to_node.reshape(ep, tokens_per_device, nodes).sum(1).max()
    load2 = np.bincount((src % g) * ep + dst.reshape(-1), minlength=g * ep).max()
    max1, max2 = max(max1, int(load1)), max(max2, int(load2))
    two_fallbacks += int(load1 > f1 or load2 > f2)
  per_byte = d  # bytes per copy in FP8 (the report dispatches in FP8)
  return {
    "ep": ep,
    "nodes": nodes,
    "topk_group": limit,
    "tokens_per_device": tokens_per_device,
    "real_copies": sizes["real_copies"],
    "mean_copies_per_pair": tokens_per_device * k / ep,
    "max_copies_per_pair": max_pair,
    "worst_case_slots_per_rank": sizes["slots_per_rank"],
    "fast_slots_per_rank": sizes["fast_slots_per_rank"],
    "worst_case_buffer_bytes": sizes["buffer_rows"] * per_byte,
    "fast_buffer_bytes": sizes["fast_slots_per_rank"] * ep * per_byte,
    "real_copies_bytes": sizes["real_copies"] * per_byte,
    "worst_case_vs_real": sizes["overhead_vs_real"],
    "fast_vs_real": sizes["fast_overhead_vs_real"],
    "fallback_rate": fallbacks / layers,
    "dropped_copies": 0,
    "two_stage": {
      **{k_: v for k_, v in two.items() if k_ != "real_copies"},
      "ranks_per_node": g,
      "max_tokens_per_node_pair": max1,
      "max_copies_per_forwarder_rank": max2,
      "fallback_rate": two_fallbacks / layers,
    },
  }


def layer_benchmark(
  config: str,
  nodes: int,
  limit: int,
  tokens_per_device: int,
  iters: int,
  capacity_factor: float,
  dispatch_factor: float = 2.0,
) -> dict:
  """The EP layer on every device against the single-device layer, node-limited vs not."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from configs import dsv3
  from dsv3_jax import config as config_lib
  from dsv3_jax.layers import experts as experts_lib
  from dsv3_jax.layers import moe as moe_lib
  from dsv3_jax.layers import routing as routing_lib
  from dsv3_jax.parallel import expert
  from dsv3_jax.parallel import mesh as mesh_lib

  n_dev = jax.device_count()
  if n_dev % nodes:
    raise ValueError(f"nodes={nodes} must divide the device count {n_dev}")
  raw = dsv3.get_config(config).model.to_dict()
  raw.update(n_group=nodes, topk_group=min(limit, nodes))
  limited = config_lib.from_dict({"model": raw}).model
  unlimited = config_lib.replace(
    config_lib.Config(model=limited), model={"topk_group": nodes}
  ).model
  mesh = mesh_lib.make_mesh(config_lib.ParallelConfig(data=1, expert=n_dev))
  ep = expert.ExpertParallel(mesh, ranks_per_node=n_dev // nodes).validate(limited)
  capped = expert.ExpertParallel(
    mesh, capacity_factor=capacity_factor, ranks_per_node=n_dev // nodes
  )
  bounded = expert.ExpertParallel(
    mesh, ranks_per_node=n_dev // nodes, dispatch_factor=dispatch_factor
  )
  d, k = limited.hidden_size, limited.num_experts_per_tok
  seq = 64
  n_local = tokens_per_device
  batch = n_local * n_dev // seq
  if batch * seq != n_local * n_dev or batch % n_dev:
    raise ValueError(
      f"tokens_per_device={n_local} x {n_dev} devices must be a multiple of "
      f"{seq} x {n_dev} (sequences of {seq})"
    )
  layer = moe_lib.MoE(limited, rngs=nnx.Rngs(params=0))
  params = {n: getattr(layer, n)[...] for n in ("gate", "bias", "w1", "w3", "w2")}
  x = jax.random.normal(jax.random.key(2), (batch, seq, d), jnp.dtype(limited.dtype))
  itemsize = jnp.dtype(limited.dtype).itemsize
  src_node_N = (np.arange(batch * seq) // n_local) // ep.ranks_per_node

  def ep_loss(cfg, setting):
    def f(p, x):
      y, aux = expert.routed_experts(
        x, p["gate"], p["bias"], p["w1"], p["w3"], p["w2"], cfg, setting
      )
      return jnp.sum(jnp.square(y.astype(jnp.float32))), aux

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

  def single_loss(cfg):
    def f(p, x):
      x_NxD = x.reshape(-1, d)
      routing = routing_lib.route(x_NxD, p["gate"], p["bias"], cfg)
      y = experts_lib.routed_ffn(
        x_NxD, routing, p["w1"], p["w3"], p["w2"], cfg.expert_block_size, cfg.matmul_precision
      )
      return jnp.sum(jnp.square(y.astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

  one = jax.devices()[0]
  params_1, x_1 = jax.device_put((params, x), one)
  results = {
    "config": config,
    "devices": n_dev,
    "nodes": nodes,
    "ep_ranks_per_node": ep.ranks_per_node,
    "tokens": batch * seq,
    "tokens_per_device": n_local,
    "hidden_size": d,
    "n_routed_experts": limited.n_routed_experts,
    "num_experts_per_tok": k,
    "activation_bytes": itemsize,
  }
  for name, cfg in (("node_limited", limited), ("unlimited", unlimited)):
    fn, single = ep_loss(cfg, ep), single_loss(cfg)  # jitted once: the timings exclude compiles
    (_, aux), _ = fn(params, x)
    routing = routing_lib.route(x_1.reshape(-1, d), params_1["gate"], params_1["bias"], cfg)
    host = routing_traffic(np.asarray(routing.experts_Nxk), src_node_N, cfg.n_routed_experts, nodes)
    n = batch * seq
    copies = float(aux["cross_node_copies"]) / n
    sends = float(aux["remote_node_sends"]) / n
    assert abs(copies - host["cross_node_copies_per_token"]) < 1e-6, (copies, host)
    assert abs(sends - host["remote_nodes_per_token"]) < 1e-6, (sends, host)
    row = {
      "topk_group": cfg.topk_group,
      "max_nodes_per_token_bound": expert.max_nodes_per_token(cfg, nodes),
      **host,
      "dropped_copies": float(aux["dropped_copies"]),
      "bytes_per_token_all_copies": 2 * k * d * itemsize,
      "cross_node_bytes_per_token_flat": 2 * copies * d * itemsize,
      "cross_node_bytes_per_token_once_per_node": 2 * sends * d * itemsize,
      "ep_step_s": _time(lambda: fn(params, x), iters),
      "single_device_step_s": _time(lambda: single(params_1, x_1), iters),
    }
    results[name] = row

  # Dispatch buffers: the dropless bound, the bounded dropless fast path (exact fallback)
  # and a dropping capacity factor (node-limited routing).
  buffers = {}
  for label, setting in (
    ("dropless", ep),
    (f"bounded_{dispatch_factor:g}", bounded),
    (f"capacity_{capacity_factor:g}", capped),
  ):
    fn = ep_loss(limited, setting)
    compiled = fn.lower(params, x).compile()
    mem = compiled.memory_analysis()
    (_, aux), _ = fn(params, x)
    sizes = expert.buffer_bytes(n_local, limited, setting, itemsize)
    buffers[label] = {
      **sizes,
      "dispatch_plus_combine_bytes": 2 * sizes["send_buffer_bytes"],
      "compiled_temp_bytes_per_device": getattr(mem, "temp_size_in_bytes", None),
      "dropped_copies": float(aux["dropped_copies"]),
      "dropped_fraction": float(aux["dropped_copies"]) / (batch * seq * k),
      "dispatch_fallbacks": float(aux["dispatch_fallbacks"]),
      "ep_step_s": _time(lambda: fn(params, x), iters),
    }
  results["buffers"] = buffers
  lim, unl = results["node_limited"], results["unlimited"]
  results["reduction"] = {
    "remote_nodes_per_token": lim["remote_nodes_per_token"] / unl["remote_nodes_per_token"],
    "cross_node_copies_per_token": (
      lim["cross_node_copies_per_token"] / unl["cross_node_copies_per_token"]
    ),
    "max_nodes_per_token": lim["nodes_per_token_max"] / unl["nodes_per_token_max"],
  }
  return results


def table(res: dict) -> str:
  """The printed report of a `run` result."""
  lines = []
  layer = res["layer"]
  lines.append(
    f"EP layer `{layer['config']}`: {layer['devices']} devices as {layer['nodes']} "
    f"nodes, {layer['tokens']} tokens, E={layer['n_routed_experts']}, "
    f"k={layer['num_experts_per_tok']}, D={layer['hidden_size']}"
  )
  head = (
    f"{'routing':<14}{'M':>3}{'nodes/tok':>10}{'max':>5}{'remote':>8}{'x-copies':>9}"
    f"{'B/tok all':>10}{'B/tok x-node':>13}{'B/tok x-node1':>14}{'EP s':>8}{'1-dev s':>8}"
  )
  lines.append(head)
  for name in ("node_limited", "unlimited"):
    r = layer[name]
    lines.append(
      f"{name:<14}{r['topk_group']:>3}{r['nodes_per_token_mean']:>10.2f}"
      f"{r['nodes_per_token_max']:>5}{r['remote_nodes_per_token']:>8.2f}"
      f"{r['cross_node_copies_per_token']:>9.2f}{r['bytes_per_token_all_copies']:>10.0f}"
      f"{r['cross_node_bytes_per_token_flat']:>13.0f}"
      f"{r['cross_node_bytes_per_token_once_per_node']:>14.0f}"
      f"{r['ep_step_s']:>8.3f}{r['single_device_step_s']:>8.3f}"
    )
  red = layer["reduction"]
  lines.append(
    f"node-limited / unlimited: remote nodes per token "
    f"x{red['remote_nodes_per_token']:.3f}, cross-node copies "
    f"x{red['cross_node_copies_per_token']:.3f}, max nodes "
    f"x{red['max_nodes_per_token']:.3f}"
  )
  for label, b in layer["buffers"].items():
    lines.append(
      f"buffer {label:<14} slots/rank {b['slots_per_rank']:>6}  rows "
      f"{b['buffer_rows']:>7} ({b['overhead_vs_real']:.2f}x real copies)  "
      f"dispatch+combine {b['dispatch_plus_combine_bytes'] / 2**20:.2f} MiB/device  "
      f"compiled temp "
      f"{(b['compiled_temp_bytes_per_device'] or 0) / 2**20:.2f} MiB  dropped "
      f"{b['dropped_fraction']:.4f}  step {b['ep_step_s']:.3f}s"
    )
  b = res.get("v3_dispatch_buffers")
  if b:
    lines.append(
      f"DeepSeek-V3 dispatch buffers (EP={b['ep']}, {b['tokens_per_device']} tokens/"
      f"device, M={b['topk_group']}, FP8): real copies "
      f"{b['real_copies_bytes'] / 2**20:.1f} MiB; worst-case buffer "
      f"{b['worst_case_buffer_bytes'] / 2**20:.1f} MiB ({b['worst_case_vs_real']:.1f}x);"
      f" fast buffer {b['fast_buffer_bytes'] / 2**20:.1f} MiB "
      f"({b['fast_vs_real']:.2f}x); max copies per pair {b['max_copies_per_pair']} "
      f"vs fast slots {b['fast_slots_per_rank']}; fallback rate "
      f"{b['fallback_rate']:.2f}; dropped {b['dropped_copies']}"
    )
    t = b["two_stage"]
    lines.append(
      f"  two-stage ({t['ranks_per_node']} ranks/node): fast buffers "
      f"{t['fast_send_buffer_bytes'] / 2**20:.1f} MiB ({t['fast_overhead_vs_real']:.2f}x), "
      f"fallback {t['fallback_send_buffer_bytes'] / 2**20:.1f} MiB "
      f"({t['fallback_overhead_vs_real']:.2f}x, up to {t['fallback_rounds_max']} stage-2 "
      f"rounds) instead of the worst case {t['worst_case_send_buffer_bytes'] / 2**20:.1f} MiB "
      f"({t['worst_case_overhead_vs_real']:.1f}x); max tokens per node pair "
      f"{t['max_tokens_per_node_pair']} vs {t['fast_stage_slots'][0]}, max copies per "
      f"forwarder rank {t['max_copies_per_forwarder_rank']} vs {t['fast_stage_slots'][1]}; "
      f"fallback rate {t['fallback_rate']:.2f}"
    )
  v3 = res["v3_shape_routing"]
  lines.append(
    f"DeepSeek-V3 shape (E={v3['n_routed_experts']}, k={v3['num_experts_per_tok']}, "
    f"{v3['nodes']} nodes, router only, {v3['tokens']} tokens):"
  )
  for name in ("node_limited", "unlimited"):
    r = v3[name]
    lines.append(
      f"  {name:<13} M={r['topk_group']}: nodes/token {r['nodes_per_token_mean']:.2f}"
      f" (max {r['nodes_per_token_max']}), remote nodes/token "
      f"{r['remote_nodes_per_token']:.2f}, cross-node copies/token "
      f"{r['cross_node_copies_per_token']:.2f}"
    )
  lines.append(
    f"  remote nodes per token: x{v3['reduction_remote_nodes']:.3f}; "
    f"max nodes per token: x{v3['reduction_max_nodes']:.3f}"
  )
  if "two_stage" in v3:
    lim, unl = v3["node_limited"], v3["unlimited"]
    m, u = lim["topk_group"], unl["topk_group"]
    lb, ub = lim["cross_node_bytes"], unl["cross_node_bytes"]
    two = v3["two_stage"]
    lines.append(
      f"  cross-node KB/token (FP8 dispatch + BF16 combine): flat M={u} "
      f"{ub['flat_bytes_per_token'] / 1e3:.1f}, flat M={m} "
      f"{lb['flat_bytes_per_token'] / 1e3:.1f}, two-stage M={u} "
      f"{ub['two_stage_bytes_per_token'] / 1e3:.1f}, two-stage M={m} "
      f"{lb['two_stage_bytes_per_token'] / 1e3:.1f}; two-stage M={m} / flat M={u} "
      f"x{two['two_stage_limited_vs_flat_unlimited']:.3f}, / two-stage M={u} "
      f"x{two['two_stage_limited_vs_two_stage_unlimited']:.3f}"
    )
  return "\n".join(lines)


def run(
  config: str = "bench",
  nodes: int = 8,
  limit: int = 4,
  tokens_per_device: int = 128,
  iters: int = 3,
  capacity_factor: float = 1.25,
  v3_tokens: int = 4096,
  dispatch_factor: float = 2.0,
  v3_tokens_per_device: int = 4096,
) -> dict:
  """The whole benchmark on the current devices (emulated ones: set XLA_FLAGS first)."""
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  jax.config.update("jax_numpy_rank_promotion", "raise")

  v3 = v3_shape_routing(v3_tokens, limit)
  v3["reduction_remote_nodes"] = (
    v3["node_limited"]["remote_nodes_per_token"] / v3["unlimited"]["remote_nodes_per_token"]
  )
  v3["reduction_max_nodes"] = (
    v3["node_limited"]["nodes_per_token_max"] / v3["unlimited"]["nodes_per_token_max"]
  )
  layer = layer_benchmark(
    config, nodes, limit, tokens_per_device, iters, capacity_factor, dispatch_factor
  )
  buffers = v3_dispatch_buffers(v3_tokens_per_device, limit=limit, dispatch_factor=dispatch_factor)
  return {
    "layer": layer,
    "v3_shape_routing": v3,
    "v3_dispatch_buffers": buffers,
    "platform": jax.devices()[0].platform,
    "jax": jax.__version__,
  }
