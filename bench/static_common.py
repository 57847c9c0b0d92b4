"""What the static cost tools share: one step builder, one HLO reader, one op attribution.

bench.tpu_static (XLA:TPU + Mosaic, deviceless) and bench.gpu_static (XLA:GPU, deviceless)
compile the same steps (`step_fn`: value_and_grad of the train loss, or one sampling
forward, of a published config in bf16) and read the compiled HLO the same way
(`hlo_records`: the ENTRY computation's scheduled ops), putting every op in the model op
group its jax/flax name stack (HLO op_name metadata) names (`attribute`, `op_group`), so
the per-group tables of both tools mean the same thing.
"""
from __future__ import annotations

import re

CONFIGS = ("cifar10", "imagenet64_p4", "imagenet64_p8")   # the published image configs
MODES = ("train", "sample")


# ----------------------------------------------------------------------------
# The steps.
# ----------------------------------------------------------------------------
def make_config(name: str):
  """Published config `name` in bf16 with one batch chunk; "tiny" for the test."""
  from rin.configs import cifar10, imagenet64
  if name == "cifar10":
    cfg = cifar10.get_config()
  elif name.startswith("imagenet64"):
    cfg = imagenet64.get_config()
    cfg.model.patch_size = int(name.rsplit("_p", 1)[1])
  elif name == "tiny":
    cfg = cifar10.get_config()
    cfg.model.update(image_size=8, patch_size=2, num_latents=16, latent_dim=128, latent_heads=4,
                     num_blocks=1, latent_layers_per_block=1, interface_dim=128, rw_heads=4)
  else:
    raise ValueError(f"config must be one of {CONFIGS + ('tiny',)}, got {name!r}")
  cfg.train.dtype = "bfloat16"
  cfg.train.batch_chunks = 1      # "auto" would look at this (CPU) host
  return cfg


def step_fn(config_name: str, impl: str, mode: str, batch: int, sds):
  """(fn, abstract args) of one step; sds(shape, dtype) makes a placed ShapeDtypeStruct."""
  import jax
  import jax.numpy as jnp
  from rin import train_state, train_step
  cfg = make_config(config_name)
  model = train_state.create_model(cfg, implementation=impl)
  m = cfg.model
  # Parameter shapes from the "xla" model: every implementation has the same parameter
  # tree, and the "xla" one traces anywhere (a GPU-only implementation refuses a CPU trace).
  shapes = jax.eval_shape(
      lambda r: train_state.create_model(cfg, implementation="xla").init(
          r, *train_state.dummy_inputs(cfg))["params"], jax.random.PRNGKey(0))
  params = jax.tree.map(lambda a: sds(a.shape, a.dtype), shapes)
  img = sds((batch, m.image_size, m.image_size, m.channels), jnp.float32)
  labels = sds((batch,), jnp.int32)
  if mode == "train":
    def fn(p, image, label, rng):
      return jax.value_and_grad(train_step.loss_and_metrics)(
          p, model, cfg, {"image": image, "label": label}, rng)
    return fn, (params, img, labels, sds((2,), jnp.uint32))
  if mode == "sample":
    def fn(p, x_t, gamma, label, z):
      return model.apply({"params": p}, x_t, gamma, label, z, train=False)
    return fn, (params, img, sds((batch,), jnp.float32), labels,
                sds((batch, m.num_latents, m.latent_dim), jnp.float32))
  raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# ----------------------------------------------------------------------------
# Compiled HLO: the ENTRY computation's scheduled ops.
# ----------------------------------------------------------------------------
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_OPNAME = re.compile(r'metadata=\{[^}]*?op_name="([^"]*)"')
_HLO_DTYPES = {"bf16": "bfloat16", "f32": "float32", "f16": "float16", "f64": "float64",
               "s32": "int32", "u32": "uint32", "s8": "int8", "u8": "uint8", "pred": "bool",
               "s64": "int64", "u64": "uint64", "s16": "int16", "u16": "uint16"}


def _strip_layouts(shape: str) -> str:
  """'bf16[2,16,128]{2,1,0:T(8,128)(2,1)S(1)}' -> 'bf16[2,16,128]' (tuples too)."""
  out, depth = [], 0
  for ch in shape:
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
    elif depth == 0:
      out.append(ch)
  return "".join(out).strip()


def _record(line: str, keep_line: bool = False):
  """The dict of one HLO instruction line (hlo_records documents its keys), or None."""
  mt = _INSTR.match(line)
  if not mt:
    return None
  name, shape, opcode, rest = mt.groups()
  cyc = re.search(r'"estimated_cycles":"(\d+)"', line)
  kernel, in_shapes = None, None
  if 'custom_call_target="tpu_custom_call"' in line:
    kernel = _kernel_name_of(line)
    lc = re.search(r"operand_layout_constraints=\{(.*?)\}, (?:[a-z_]+=|$)", line)
    if lc:
      in_shapes = ",".join(
          f"{_HLO_DTYPES.get(dt, dt)}[{', '.join(d for d in dims.split(',') if d)}]"
          for dt, dims in re.findall(r"([a-z]+\d*)\[([\d,]*)\]", _strip_layouts(lc.group(1))))
  mo = _OPNAME.search(line)
  depth, args = 0, []
  for i, ch in enumerate(rest):               # operands: up to the call's closing paren
    if ch == "(":
      depth += 1
    elif ch == ")":
      if depth == 0:
        args = re.findall(r"%([\w.\-]+)", rest[:i])
        break
      depth -= 1
  target = re.search(r'custom_call_target="([^"]*)"', line)
  calls = re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line)
  r = dict(name=name, opcode=opcode, cycles=int(cyc.group(1)) if cyc else None,
           kernel=kernel, op_name=mo.group(1) if mo else "", shape=_strip_layouts(shape),
           operands=args, in_shapes=in_shapes, target=target.group(1) if target else None,
           calls=calls)
  if keep_line:
    r["line"] = line
  return r


def hlo_computations(text: str, keep_line: bool = False):
  """(name of the ENTRY computation, {computation name: [instruction records]}) of an HLO
  module's text; records as hlo_records (with "line", the raw text, if keep_line)."""
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    head = re.match(r"^(ENTRY )?%?([\w.\-]+) \(", line)
    if head:
      cur = head.group(2)
      comps[cur] = []
      if head.group(1):
        entry = cur
      continue
    if cur is None:
      continue
    r = _record(line, keep_line)
    if r is not None:
      comps[cur].append(r)
  return entry, comps


def hlo_records(text: str, keep_line: bool = False):
  """One dict per scheduled op of the ENTRY computation (fusion bodies and other called
  computations skipped): name, opcode, cycles (XLA:TPU estimated_cycles or None), kernel
  (Pallas kernel name of a tpu_custom_call, else None), op_name (the jax/flax name stack
  from the op's metadata, "" if none), shape (result, layouts stripped), operands (names),
  in_shapes (a TPU custom call's operand shapes as kernel_key writes them, else None),
  target (custom_call_target or None), calls (called computations: fusion bodies, reducers)."""
  entry, comps = hlo_computations(text, keep_line)
  return comps.get(entry, [])


def hlo_ops(text: str):
  """[(name, opcode, estimated_cycles or None, kernel name or None)] of scheduled ops."""
  return [(r["name"], r["opcode"], r["cycles"], r["kernel"]) for r in hlo_records(text)]


# ----------------------------------------------------------------------------
# Attribution: which model op each XLA op and kernel call belongs to.
# ----------------------------------------------------------------------------
# Groups, in table order. The kernel-backed ops first (the ones whose implementation
# differs between "xla" and "pallas_tpu"); the rest is the same code in both paths.
OP_GROUPS = ("read", "write", "latent_attn", "latent_mlp", "io", "other")
GROUP_DOC = {
    "read": "read block (RINBlock .../read: LN, Q/KV/out projections, attention, residual)",
    "write": "write block (.../write: attention and interface MLP, residuals)",
    "latent_attn": "latent self-attention (.../latent_attn_i)",
    "latent_mlp": "latent MLPs and their LNs (read_mlp, latent_mlp_i)",
    "io": "stem, latent init and self-conditioning, readout (RIN._interface/_latents/_readout)",
    "other": "loss, noise, RNG, drop path, parameter-gradient glue without a module",
}


def op_group(op_name: str):
  """(group, "fwd" | "bwd") of an op from its jax/flax name stack (HLO op_name).

  The first flax module segment that names a group wins ("block_0/read/..." -> read);
  "transpose(" in the stack marks the backward pass. Unknown or empty -> "other"."""
  direction = "bwd" if "transpose(" in op_name else "fwd"
  for seg in op_name.split("/"):
    if seg == "read":
      return "read", direction
    if seg == "write":
      return "write", direction
    if re.fullmatch(r"latent_attn_\d+", seg):
      return "latent_attn", direction
    if re.fullmatch(r"(latent_mlp(_ln)?_\d+|read_mlp(_ln)?)", seg):
      return "latent_mlp", direction
    if seg in ("RIN._interface", "RIN._latents", "RIN._readout", "VideoRIN._interface",
               "VideoRIN._latents", "VideoRIN._readout"):
      return "io", direction
  return "other", direction


# Top-level parameters of the stem, latent init and readout (the "io" group).
_IO_PARAMS = ("stem", "stem_ln", "readout", "readout_ln", "pos_interface", "pos_latents",
              "class_dense", "time_dense_0", "time_dense_1")


def _param_group(param_name: str):
  """Group of an entry parameter from its flattened path ('p__block_0____read____wq__.0')."""
  segs = [s for s in re.split(r"_{4}|^p__|__(?:\.\d+)?$", param_name) if s]
  path = "/".join(segs)
  g, _ = op_group(path)
  # op_group names no group for self_cond* paths: they are "other" there, so io here.
  if g == "other" and segs and (segs[0] in _IO_PARAMS or segs[0].startswith("self_cond")):
    g = "io"
  return g


def attribute(records):
  """Sets each record's "group" and "direction" in place; returns records.

  From its op_name; an op without one (layout copies, parameter converts) takes the group
  of its first operand that has one (entry parameters by their flattened module path),
  marked "inherited"."""
  by_name = {r["name"]: r for r in records}
  for r in records:
    if r["opcode"] == "parameter":             # op_name "p['block_0']['read']['wq']"
      r["group"], r["direction"] = _param_group(r["name"]), "fwd"
    elif r["op_name"]:
      r["group"], r["direction"] = op_group(r["op_name"])
  def find(r, depth):
    if "group" in r:
      return r["group"], r["direction"]
    if depth > 6:
      return None
    for a in r["operands"]:
      if a in by_name:
        g = find(by_name[a], depth + 1)
        if g:
          return g
    return None
  for r in records:
    if "group" not in r:
      g = find(r, 0)
      r["group"], r["direction"] = g or ("other", "fwd")
      r["inherited"] = True
  return records



def _short_op_name(op_name: str) -> str:
  """'jit(fn)/transpose(jvp(RIN))/RIN._blocks/block_0/read/div' -> 'bwd block_0/read/div'."""
  s = re.sub(r"^jit\(fn\)/", "", op_name)
  s = re.sub(r"^(transpose\()?jvp\(RIN\)\)?/(RIN\._blocks/)?", "", s)
  return s


def _kernel_name_of(line: str):
  m = re.search(r'op_name="[^"]*?(rin_[a-z_]+|[A-Za-z_]\w*)"', line)
  for cand in re.findall(r"(rin_[a-z0-9_]+?)(?:_?\.\d+|_\b|\b)", line):
    return cand.rstrip("_")
  return m.group(1) if m else "?"



# kernels.api op/shape-class prefix -> the op group of its calls.
CLASS_GROUPS = {"attention": "latent_attn", "latent_attn": "latent_attn", "read": "read",
                "write": "write"}


class _recording_op_classes:
  """Context: {group: set of kernels.api.shape_class keys} of the kernel-backed ops traced
  inside (kernels.api.resolve_implementation sees each op's key)."""

  def __enter__(self):
    from kernels import api
    self.api, self.orig, self.classes = api, api.resolve_implementation, {}

    def rec(implementation, op_key=None):
      if op_key is not None:
        g = CLASS_GROUPS.get(op_key.split(":")[0])
        if g:
          self.classes.setdefault(g, set()).add(op_key)
      return self.orig(implementation, op_key)

    api.resolve_implementation = rec
    return self.classes

  def __exit__(self, *exc):
    self.api.resolve_implementation = self.orig



def rewrite_wins(module, rows: dict, path=None) -> dict:
  """Rewrites the WINS dict of a cost-table module (kernels/pallas_tpu/cost_table.py,
  kernels/gpu_cost_table.py) with `rows` merged over its current rows; the text before
  `WINS: dict` (the docstring) is kept. Returns the merged table."""
  import importlib
  path = path or module.__file__
  src = open(path).read()
  old = dict(importlib.reload(module).WINS) if path == module.__file__ else {}
  old.update(rows)
  head = src[: src.index("\nWINS: dict") + 1]
  body = "".join(f"    {k!r}: {{\n" + "".join(f"        {f!r}: {v!r},\n"
                                             for f, v in sorted(old[k].items())) + "    },\n"
                 for k in sorted(old))
  open(path, "w").write(head + "WINS: dict[str, dict] = {\n" + body + "}\n")
  return old
