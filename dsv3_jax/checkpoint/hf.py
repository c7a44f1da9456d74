"""Hugging Face DeepSeek-V3 checkpoints in and out: safetensors, name mapping, FP8 blocks.

A HF directory holds `config.json` and one or more `*.safetensors` files (with
`model.safetensors.index.json` when sharded). Tensors are read one at a time straight from
the files (a small dependency-free safetensors reader: numpy + ml_dtypes), so the whole
checkpoint never sits in host memory; each of this model's parameters is assembled from its
HF tensors, moved to the device and released before the next one.

Name mapping (HF `[out, in]` kernels <-> ours `[in, out]`; `i` a HF layer index):
  model.embed_tokens.weight                      embed                     [V, D]
  model.norm.weight / lm_head.weight             norm.scale / head.kernel  (head transposed)
  model.layers.i.input_layernorm.weight          {dense|moe}.attn_norm.scale[l]
  model.layers.i.post_attention_layernorm.weight {dense|moe}.ffn_norm.scale[l]
  model.layers.i.self_attn.q_a_proj / q_a_layernorm / q_b_proj   attn.wq_a / q_norm / wq_b
  model.layers.i.self_attn.q_proj (q_lora_rank null)              attn.wq
  model.layers.i.self_attn.kv_a_proj_with_mqa / kv_a_layernorm    attn.wkv_a / kv_norm
  model.layers.i.self_attn.kv_b_proj / o_proj                     attn.wkv_b / wo
  model.layers.i.mlp.{gate,up,down}_proj (dense layers)           ffn.w1 / w3 / w2
  model.layers.i.mlp.gate.weight [E, D]                           ffn.gate [D, E]
  model.layers.i.mlp.gate.e_score_correction_bias                 ffn.bias (RouterBias)
  model.layers.i.mlp.experts.j.{gate,up,down}_proj                ffn.w1 / w3 / w2 [l, j]
  model.layers.i.mlp.shared_experts.{gate,up,down}_proj           ffn.shared.w1 / w3 / w2
  model.layers.N+k.{enorm, hnorm, eh_proj, shared_head.norm}      mtp[k].enorm/hnorm/eh_proj/norm
  model.layers.N+k.{self_attn.*, mlp.*, *_layernorm}              mtp[k].block.*
  model.layers.N+k.{embed_tokens, shared_head.head}               the main embed / head (shared;
                                                                  checked equal on import)
Experts are stored per expert (`experts.j.*`), the layout of the published checkpoint and of
what transformers 5.x `save_pretrained` writes (it fuses them only in memory).

FP8: a weight stored as float8_e4m3fn with a sibling `weight_scale_inv` f32
`[ceil(out/128), ceil(in/128)]` is dequantized block by block with 128x128 blocks always,
as DeepSeek's format defines (edge blocks partial). transformers' CPU dequantizer instead
derives the block as rows // scale_rows, which mis-dequantizes e.g. a 192-row q_b_proj and
rejects the 576-row kv_a_proj_with_mqa; that trap is avoided here. Export writes FP8 for
every projection that runs as an FP8 dot in the model (attention, dense MLP, experts,
shared experts) and keeps the embedding, head, router, norms, biases and the MTP `eh_proj`
in high precision, as the published checkpoint does.

Strictness: before anything is read, missing, unexpected and mis-shaped tensors are
collected and raised in one `ValueError` listing them by name; nothing is silently
initialised. The one tolerated absence: MTP layers declared in `config.json` of which the
files hold no tensor at all (transformers' `save_pretrained` writes none) give a model
without MTP and a logged warning; `mtp=True` makes that an error too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx

from dsv3_jax.checkpoint.hf_config import from_hf_config, to_hf_config
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.moe import RouterBias
from dsv3_jax.quant import fp8 as fp8_lib

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_OUT_DTYPES = {"bfloat16": "BF16", "float32": "F32"}


# ----------------------------------------------------------------------------- safetensors
class TensorInfo(NamedTuple):
  file: str
  dtype: str  # safetensors dtype name, e.g. "BF16"
  shape: tuple
  start: int  # absolute byte offsets in `file`
  end: int


def read_header(path: str) -> dict[str, TensorInfo]:
  """The tensors of one safetensors file (its JSON header only; no data is read)."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    header = json.loads(f.read(n))
  base = 8 + n
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    start, end = meta["data_offsets"]
    out[name] = TensorInfo(path, meta["dtype"], tuple(meta["shape"]), base + start, base + end)
  return out


def read_tensor(info: TensorInfo) -> np.ndarray:
  """One tensor's data, read with a single seek + read."""
  if info.dtype not in _DTYPES:
    raise ValueError(f"{info.file}: unsupported safetensors dtype {info.dtype}")
  with open(info.file, "rb") as f:
    f.seek(info.start)
    buf = f.read(info.end - info.start)
  return np.frombuffer(buf, _DTYPES[info.dtype]).reshape(info.shape)


class TensorSpec(NamedTuple):
  """A tensor to be written: its name, safetensors dtype name and shape."""

  name: str
  dtype: str
  shape: tuple


def write_safetensors(path: str, planned: list[TensorSpec], produce) -> int:
  """Writes tensors whose names, dtypes and shapes are known up front.

  `produce(name)` returns each tensor's array when its turn comes, so only one tensor is in
  host memory at a time. Returns the bytes of tensor data written.
  """
  header, offset = {}, 0
  for p in planned:
    nbytes = int(np.prod(p.shape, dtype=np.int64)) * _DTYPES[p.dtype].itemsize
    header[p.name] = {
      "dtype": p.dtype,
      "shape": list(p.shape),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for p in planned:
      arr = np.ascontiguousarray(produce(p.name))
      if arr.dtype != _DTYPES[p.dtype] or tuple(arr.shape) != tuple(p.shape):
        raise ValueError(
          f"tensor {p.name}: produced {arr.dtype}{list(arr.shape)}, "
          f"planned {p.dtype}{list(p.shape)}"
        )
      f.write(arr.tobytes())
  return offset


def save_tensors(path: str, tensors: dict[str, np.ndarray]) -> int:
  """Writes a {name: array} dict as one safetensors file (a convenience for small files)."""
  specs = []
  for name, t in tensors.items():
    if t.dtype not in _NAMES:
      raise ValueError(f"tensor {name}: dtype {t.dtype} has no safetensors name")
    specs.append(TensorSpec(name, _NAMES[t.dtype], tuple(t.shape)))
  return write_safetensors(path, specs, tensors.__getitem__)


class HFCheckpoint:
  """Random access to the tensors of a HF directory, by name, one tensor at a time."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    else:
      files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"{path}: no *.safetensors files")
    self.tensors: dict[str, TensorInfo] = {}
    for name in files:
      header = read_header(os.path.join(path, name))
      twice = sorted(set(header) & set(self.tensors))
      if twice:
        raise ValueError(f"{path}: tensor(s) stored in more than one file: {twice[:5]}")
      self.tensors.update(header)

  def read(self, name: str) -> np.ndarray:
    return read_tensor(self.tensors[name])

  def read_float(self, name: str) -> np.ndarray:
    """The tensor in float32; FP8 weights are dequantized with their 128x128 block scales."""
    t = self.read(name)
    if t.dtype == _DTYPES["F8_E4M3"]:
      scale = self.read(scale_name(name)).astype(np.float32)
      return fp8_lib.dequantize_hf(np.asarray(t), np.asarray(scale))
    return t.astype(np.float32)


def scale_name(weight_name: str) -> str:
  return weight_name[: -len("weight")] + "weight_scale_inv"


def read_hf_config(path: str) -> dict:
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- the mapping
class Entry(NamedTuple):
  """One HF tensor and where it lives in this model."""

  hf: str  # HF tensor name
  path: tuple  # ("params"|"biases", key, ...) into the pure-dict state
  index: tuple  # leading indices into that leaf (stacked layer, expert)
  kind: str  # linear | gate | head | embed | vector | shared_embed | shared_head
  shape: tuple  # HF shape
  fp8: bool = False  # written as FP8 (+ weight_scale_inv) by an FP8 export


def _block_entries(
  cfg: ModelConfig, hf_layer: int, base: tuple, index: tuple, moe: bool
) -> Iterator[Entry]:
  d, h = cfg.hidden_size, cfg.num_attention_heads
  p = f"model.layers.{hf_layer}."
  par, bia = ("params",) + base, ("biases",) + base

  def lin(name, ours, shape, quant=True):
    return Entry(p + name + ".weight", par + ours + ("kernel",), index, "linear", shape, quant)

  def vec(name, ours, n):
    return Entry(p + name + ".weight", par + ours + ("scale",), index, "vector", (n,))

  yield vec("input_layernorm", ("attn_norm",), d)
  yield vec("post_attention_layernorm", ("ffn_norm",), d)
  a = ("attn",)
  if cfg.q_lora_rank:
    yield lin("self_attn.q_a_proj", a + ("wq_a",), (cfg.q_lora_rank, d))
    yield vec("self_attn.q_a_layernorm", a + ("q_norm",), cfg.q_lora_rank)
    yield lin("self_attn.q_b_proj", a + ("wq_b",), (h * cfg.qk_head_dim, cfg.q_lora_rank))
  else:
    yield lin("self_attn.q_proj", a + ("wq",), (h * cfg.qk_head_dim, d))
  yield lin(
    "self_attn.kv_a_proj_with_mqa", a + ("wkv_a",), (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d)
  )
  yield vec("self_attn.kv_a_layernorm", a + ("kv_norm",), cfg.kv_lora_rank)
  yield lin(
    "self_attn.kv_b_proj",
    a + ("wkv_b",),
    (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
  )
  yield lin("self_attn.o_proj", a + ("wo",), (d, h * cfg.v_head_dim))
  f = ("ffn",)
  if not moe:
    i = cfg.intermediate_size
    yield lin("mlp.gate_proj", f + ("w1",), (i, d))
    yield lin("mlp.up_proj", f + ("w3",), (i, d))
    yield lin("mlp.down_proj", f + ("w2",), (d, i))
    return
  e, w = cfg.n_routed_experts, cfg.moe_intermediate_size
  yield Entry(p + "mlp.gate.weight", par + f + ("gate",), index, "gate", (e, d))
  yield Entry(p + "mlp.gate.e_score_correction_bias", bia + f + ("bias",), index, "vector", (e,))
  for j in range(e):
    q = f"{p}mlp.experts.{j}."
    yield Entry(q + "gate_proj.weight", par + f + ("w1",), index + (j,), "linear", (w, d), True)
    yield Entry(q + "up_proj.weight", par + f + ("w3",), index + (j,), "linear", (w, d), True)
    yield Entry(q + "down_proj.weight", par + f + ("w2",), index + (j,), "linear", (d, w), True)
  if cfg.n_shared_experts:
    s = cfg.n_shared_experts * w
    yield lin("mlp.shared_experts.gate_proj", f + ("shared", "w1"), (s, d))
    yield lin("mlp.shared_experts.up_proj", f + ("shared", "w3"), (s, d))
    yield lin("mlp.shared_experts.down_proj", f + ("shared", "w2"), (d, s))


def entries(cfg: ModelConfig, *, tied_head: bool = False) -> list[Entry]:
  """Every HF tensor of `cfg` (MTP layers included when num_nextn_predict_layers > 0)."""
  d, v = cfg.hidden_size, cfg.vocab_size
  out = [
    Entry("model.embed_tokens.weight", ("params", "embed"), (), "embed", (v, d)),
    Entry("model.norm.weight", ("params", "norm", "scale"), (), "vector", (d,)),
  ]
  if not tied_head:
    out.append(Entry("lm_head.weight", ("params", "head", "kernel"), (), "head", (v, d)))
  for i in range(cfg.num_hidden_layers):
    moe = i >= cfg.n_dense_layers
    base, l = ("moe",) if moe else ("dense",), i - cfg.n_dense_layers if moe else i
    out.extend(_block_entries(cfg, i, base, (l,), moe))
  for k in range(cfg.num_nextn_predict_layers):
    n = cfg.num_hidden_layers + k
    p, par = f"model.layers.{n}.", ("params", "mtp", k)
    out += [
      Entry(p + "enorm.weight", par + ("enorm", "scale"), (), "vector", (d,)),
      Entry(p + "hnorm.weight", par + ("hnorm", "scale"), (), "vector", (d,)),
      Entry(p + "eh_proj.weight", par + ("eh_proj", "kernel"), (), "linear", (d, 2 * d)),
      Entry(p + "shared_head.norm.weight", par + ("norm", "scale"), (), "vector", (d,)),
      Entry(p + "embed_tokens.weight", ("params", "embed"), (), "shared_embed", (v, d)),
      Entry(p + "shared_head.head.weight", ("params", "head", "kernel"), (), "shared_head", (v, d)),
    ]
    out.extend(_block_entries(cfg, n, ("mtp", k, "block"), (), True))
  return out


def _rope_rows(cfg: ModelConfig, hf_name: str) -> Optional[np.ndarray]:
  """Row order turning a half-split rope layout (`rope_interleave: false`) into interleaved.

  HF's non-interleaved layout rotates pairs (x[i], x[i + R/2]); ours rotates (y[2i], y[2i+1]),
  so y[2i] = x[i], y[2i+1] = x[i + R/2] gives identical attention scores.
  """
  r = cfg.qk_rope_head_dim
  perm_R = np.stack([np.arange(r // 2), np.arange(r // 2) + r // 2], axis=1).reshape(-1)
  if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
    rows = np.arange(cfg.num_attention_heads * cfg.qk_head_dim).reshape(
      cfg.num_attention_heads, cfg.qk_head_dim
    )
    rows[:, cfg.qk_nope_head_dim :] = rows[:, cfg.qk_nope_head_dim :][:, perm_R]
    return rows.reshape(-1)
  if hf_name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
    rows = np.arange(cfg.kv_lora_rank + r)
    rows[cfg.kv_lora_rank :] = rows[cfg.kv_lora_rank :][perm_R]
    return rows
  return None


def _flip(e: Entry, t: np.ndarray) -> np.ndarray:
  """HF <-> ours: kernels are transposed ([out, in] <-> [in, out]); the rest is as is."""
  return t.T if e.kind in ("linear", "gate", "head", "shared_head") else t


# ----------------------------------------------------------------------------- import
def _mtp_prefixes(cfg: ModelConfig, depth: int) -> tuple:
  return tuple(f"model.layers.{cfg.num_hidden_layers + k}." for k in range(depth))


def _ignorable(name: str, info: TensorInfo) -> bool:
  """Tensors that carry nothing this model needs: rotary caches and zero-size tensors."""
  return name.endswith("rotary_emb.inv_freq") or 0 in info.shape


def check_tensors(ckpt: HFCheckpoint, plan: list[Entry], ignore_prefixes: tuple = ()) -> None:
  """Raises one ValueError naming every missing, unexpected or mis-shaped tensor."""
  expected = {e.hf: e for e in plan}
  scales = set()
  missing, badshape, baddtype = [], [], []
  for name, e in expected.items():
    info = ckpt.tensors.get(name)
    if info is None:
      missing.append(name)
      continue
    if tuple(info.shape) != tuple(e.shape):
      badshape.append(f"{name}: {list(info.shape)}, expected {list(e.shape)}")
    sname = scale_name(name) if name.endswith(".weight") else None
    if info.dtype == "F8_E4M3":
      if e.kind not in ("linear",):
        baddtype.append(f"{name}: FP8 is only supported for linear projections")
      elif sname not in ckpt.tensors:
        missing.append(sname)
      else:
        scales.add(sname)
        want = tuple(-(-n // fp8_lib.BLOCK) for n in e.shape)
        got = tuple(ckpt.tensors[sname].shape)
        if got != want:
          badshape.append(f"{sname}: {list(got)}, expected {list(want)} (128x128 blocks)")
    elif info.dtype not in ("F32", "BF16", "F16", "F64"):
      baddtype.append(f"{name}: dtype {info.dtype}")
  unexpected = sorted(
    n
    for n, info in ckpt.tensors.items()
    if n not in expected
    and n not in scales
    and not _ignorable(n, info)
    and not n.startswith(ignore_prefixes)
  )
  problems = []
  for label, names in (
    ("missing", missing),
    ("unexpected", unexpected),
    ("mis-shaped", badshape),
    ("unsupported dtype", baddtype),
  ):
    if names:
      problems.append(f"{len(names)} {label}:\n  " + "\n  ".join(sorted(names)))
  if problems:
    raise ValueError(
      f"HF checkpoint {ckpt.path} does not match the model config:\n" + "\n".join(problems)
    )


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def _abstract(cfg: ModelConfig):
  from dsv3_jax import model as model_lib  # local: the model imports nothing from here

  return nnx.split(model_lib.abstract(cfg), nnx.Param, RouterBias)


def abstract_state(cfg: ModelConfig) -> dict:
  """{"params": pure dict, "biases": pure dict} of ShapeDtypeStructs (nothing allocated)."""
  _, params, biases = _abstract(cfg)
  return {"params": nnx.to_pure_dict(params), "biases": nnx.to_pure_dict(biases)}


def model_from_state(cfg: ModelConfig, state: dict):
  """The `Transformer` holding `state` ({"params", "biases"} pure dicts of arrays)."""
  graphdef, params, biases = _abstract(cfg)
  nnx.replace_by_pure_dict(params, state["params"])
  nnx.replace_by_pure_dict(biases, state["biases"])
  return nnx.merge(graphdef, params, biases)


def model_state(model) -> tuple[ModelConfig, dict]:
  """(cfg, {"params", "biases"} pure dicts) of a `Transformer`."""
  _, params, biases = nnx.split(model, nnx.Param, RouterBias)
  return model.cfg, {"params": nnx.to_pure_dict(params), "biases": nnx.to_pure_dict(biases)}


def _check_shared_copies(ckpt: HFCheckpoint, plan: list[Entry], tied: bool) -> None:
  """The MTP layers' `embed_tokens` / `shared_head.head` must equal the main embedding / head:
  this model shares them (checked before anything is assembled)."""
  for e in plan:
    if e.kind in ("shared_embed", "shared_head"):
      main = "model.embed_tokens.weight" if e.kind == "shared_embed" or tied else "lm_head.weight"
      if not np.array_equal(ckpt.read_float(e.hf), ckpt.read_float(main)):
        raise ValueError(
          f"{e.hf} differs from {main}: this model shares the MTP embedding and "
          "head with the main model (load with mtp=False to drop the MTP layers)"
        )


def load_hf_state(
  path: str, cfg: Optional[ModelConfig] = None, *, mtp: Optional[bool] = None, **overrides
) -> tuple[ModelConfig, dict]:
  """Reads a HF directory into (cfg, {"params": ..., "biases": ...}) of float32 arrays.

  `cfg` defaults to the one built from `config.json` (`overrides` applied). `mtp`: None loads
  the MTP layers when the checkpoint has them and builds the model without MTP when it has
  none of them (transformers' `save_pretrained` writes none); True requires them; False
  ignores them. Parameters are assembled one leaf at a time.
  """
  hf_cfg = read_hf_config(path)
  if cfg is None:
    cfg = from_hf_config(hf_cfg, **overrides)
  ckpt = HFCheckpoint(path)
  declared = _mtp_prefixes(cfg, cfg.num_nextn_predict_layers)
  present = any(n.startswith(declared) for n in ckpt.tensors) if declared else False
  ignore = ()
  if mtp is False or (mtp is None and declared and not present):
    if mtp is None:
      logging.warning(
        "%s: config.json declares %d MTP layer(s) but the files hold none; "
        "building the model without MTP",
        path,
        len(declared),
      )
    ignore = declared
    cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0).validate()
  interleaved = hf_cfg.get("rope_interleave", True) is not False
  tied = bool(hf_cfg.get("tie_word_embeddings", False))
  plan = entries(cfg, tied_head=tied)
  check_tensors(ckpt, plan, ignore)
  _check_shared_copies(ckpt, plan, tied)

  state = abstract_state(cfg)
  by_leaf: dict[tuple, list[Entry]] = {}
  for e in plan:
    if e.kind not in ("shared_embed", "shared_head"):
      by_leaf.setdefault(e.path, []).append(e)
  for leaf_path, group in by_leaf.items():
    spec = _get(state, leaf_path)
    arr = np.zeros(spec.shape, np.float32)
    filled = np.zeros(spec.shape[: len(group[0].index)], bool)
    for e in group:
      t = ckpt.read_float(e.hf)
      rows = None if interleaved else _rope_rows(cfg, e.hf)
      if rows is not None:
        t = t[rows]
      arr[e.index] = _flip(e, t)
      filled[e.index] = True
    if not filled.all():  # a mapping bug, never a checkpoint problem
      raise AssertionError(f"leaf {leaf_path} is not fully covered by HF tensors")
    _set(state, leaf_path, jnp.asarray(arr))
    del arr
  if tied:
    state["params"]["head"]["kernel"] = state["params"]["embed"].T
  return cfg, state


def load_hf(
  path: str, cfg: Optional[ModelConfig] = None, *, mtp: Optional[bool] = None, **overrides
):
  """A ready `Transformer` from a HF DeepSeek-V3 directory (see `load_hf_state`)."""
  cfg, state = load_hf_state(path, cfg, mtp=mtp, **overrides)
  return model_from_state(cfg, state)


# ----------------------------------------------------------------------------- export
def export_plan(cfg: ModelConfig, dtype: str = "bfloat16", fp8: bool = False) -> list[tuple]:
  """[(Entry, safetensors dtype)] plus scale tensors, in write order."""
  if dtype not in _OUT_DTYPES:
    raise ValueError(f"export dtype {dtype!r}: must be one of {sorted(_OUT_DTYPES)}")
  base = _OUT_DTYPES[dtype]
  out = []
  for e in entries(cfg):
    if e.hf.endswith("e_score_correction_bias"):
      out.append((e, "F32"))  # the routing bias stays float32, as published
    elif fp8 and e.fp8:
      out.append((e, "F8_E4M3"))
    else:
      out.append((e, base))
  return out


def save_hf_state(
  path: str,
  cfg: ModelConfig,
  state: dict,
  *,
  dtype: str = "bfloat16",
  fp8: bool = False,
  pow2: bool = False,
  max_shard_bytes: int = 4 << 30,
) -> dict:
  """Writes `state` ({"params", "biases"} pure dicts) as a HF DeepSeek-V3 directory.

  BF16 (or float32) tensors; with `fp8`, projections as float8_e4m3fn + `weight_scale_inv`
  (128x128 blocks, scale = amax / 448, rounded up to a power of two with `pow2`). Tensors are
  produced one at a time from the (possibly device-resident) state. Returns a summary.
  """
  os.makedirs(path, exist_ok=True)
  planned, producers = [], {}
  for e, dt in export_plan(cfg, dtype, fp8):
    planned.append(TensorSpec(e.hf, dt, e.shape))
    if dt == "F8_E4M3":
      nb = tuple(-(-n // fp8_lib.BLOCK) for n in e.shape)
      planned.append(TensorSpec(scale_name(e.hf), "F32", nb))
    producers[e.hf] = (e, dt)

  cache: dict[str, tuple] = {}

  def produce(name: str) -> np.ndarray:
    if name in cache:  # the scale of the FP8 weight produced just before
      return cache.pop(name)
    e, dt = producers[name]
    leaf = _get(state, e.path)
    t = _flip(e, np.asarray(jax.device_get(leaf[e.index] if e.index else leaf), np.float32))
    if dt == "F8_E4M3":
      q, s = fp8_lib.quantize_hf(t, pow2=pow2)
      cache[scale_name(name)] = np.asarray(s, np.float32)
      return np.asarray(q)
    return t.astype(_DTYPES[dt])

  shards, current, size = [], [], 0
  for p in planned:
    nbytes = int(np.prod(p.shape, dtype=np.int64)) * _DTYPES[p.dtype].itemsize
    weight_scale_pair = p.name.endswith("weight_scale_inv")  # keep a scale with its weight
    if current and size + nbytes > max_shard_bytes and not weight_scale_pair:
      shards.append(current)
      current, size = [], 0
    current.append(p)
    size += nbytes
  shards.append(current)

  total, weight_map = 0, {}
  for i, shard in enumerate(shards):
    fname = (
      SINGLE_FILE if len(shards) == 1 else (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    )
    total += write_safetensors(os.path.join(path, fname), shard, produce)
    weight_map.update({p.name: fname for p in shard})
  if len(shards) > 1:
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
  elif os.path.exists(os.path.join(path, INDEX_FILE)):
    os.remove(os.path.join(path, INDEX_FILE))

  hf = to_hf_config(cfg)
  hf["torch_dtype"] = dtype
  if fp8:
    hf["quantization_config"] = {
      "quant_method": "fp8",
      "fmt": "e4m3",
      "activation_scheme": "dynamic",
      "weight_block_size": [fp8_lib.BLOCK, fp8_lib.BLOCK],
    }
    if pow2:
      hf["quantization_config"]["scale_fmt"] = "ue8m0"
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=1, sort_keys=True)
  return {
    "tensors": len(planned),
    "bytes": total,
    "shards": len(shards),
    "dtype": dtype,
    "fp8": fp8,
  }


def save_hf(model, path: str, **kwargs) -> dict:
  """Writes a `Transformer` as a HF DeepSeek-V3 directory (see `save_hf_state`)."""
  cfg, state = model_state(model)
  return save_hf_state(path, cfg, state, **kwargs)


__all__ = [
  "HFCheckpoint",
  "Entry",
  "TensorSpec",
  "entries",
  "check_tensors",
  "load_hf",
  "load_hf_state",
  "save_hf",
  "save_hf_state",
  "read_hf_config",
  "read_header",
  "read_tensor",
  "write_safetensors",
  "save_tensors",
  "abstract_state",
  "model_from_state",
  "model_state",
  "scale_name",
]
