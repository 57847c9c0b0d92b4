"""implementation="xla" and the op API: argument checks, dispatch, and the reference against
a hand-written float64 NumPy oracle (independent of kernels/reference.py's own code),
compared with the op test base's rule (tests/kernels/op_cases.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import reference
from tests.kernels import op_cases


def _np_attention(q, k, v):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  s = np.exp(s - s.max(-1, keepdims=True))
  p = s / s.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def _np_ln(x, g, b):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + reference.LN_EPS) * g + b


def _np_block(xq, xkv, p, heads, mlp):
  from scipy.special import erf
  p = {k: (None if v is None else np.asarray(v, np.float64)) for k, v in p._asdict().items()}
  xq, xkv = np.asarray(xq, np.float64), np.asarray(xkv, np.float64)
  split = lambda y: y.reshape(*y.shape[:-1], heads, -1)
  h = _np_ln(xq, p["ln_scale"], p["ln_bias"])
  o = _np_attention(split(h @ p["wq"] + p["bq"]), split(xkv @ p["wk"] + p["bk"]),
                    split(xkv @ p["wv"] + p["bv"]))
  y = xq + o.reshape(*o.shape[:-2], -1) @ p["wo"] + p["bo"]
  if mlp:
    h = _np_ln(y, p["mlp_ln_scale"], p["mlp_ln_bias"]) @ p["w1"] + p["b1"]
    y = y + (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ p["w2"] + p["b2"]
  return y


@pytest.mark.parametrize("shape", [(2, 5, 3, 8), (1, 1, 1, 4), (1, 9, 2, 72)])
@pytest.mark.parametrize("kv_len", [1, 7, 33])
def test_reference_attention_matches_numpy_float64(shape, kv_len):
  b, lq, h, d = shape
  (q, k, v), _ = op_cases.attention_inputs(0, b, lq, kv_len, h, d, jnp.float32)
  out = kernels.cross_attention(q, k, v, implementation="xla")
  op_cases.assert_close(out, _np_attention(q, k, v),
                        tol=op_cases.tolerance("xla", jnp.float32))


@pytest.mark.parametrize("mlp", [0, 2])
def test_reference_blocks_match_numpy_float64(mlp):
  key = jax.random.PRNGKey(1)
  z = jax.random.normal(key, (2, 7, 48))
  x = jax.random.normal(jax.random.fold_in(key, 1), (2, 13, 32))
  rp = op_cases.read_params(jax.random.fold_in(key, 2), 48, 32, 32, jnp.float32)
  out = kernels.read_block(z, x, rp, num_heads=4, implementation="xla")
  # Blocks: LN and three GEMMs deep, at 20x the attention's tolerance.
  tol = 20 * op_cases.tolerance("xla", jnp.float32)
  op_cases.assert_close(out, _np_block(z, x, rp, 4, False), tol=tol, what="read")
  wp = op_cases.write_params(jax.random.fold_in(key, 3), 32, 48, 32, mlp * 32, jnp.float32)
  out = kernels.write_block(x, z, wp, num_heads=4, implementation="xla")
  op_cases.assert_close(out, _np_block(x, z, wp, 4, bool(mlp)), tol=tol, what="write")


def _np_latent(z, p, heads, residual):
  p = {k: np.asarray(v, np.float64) for k, v in p._asdict().items()}
  z = np.asarray(z, np.float64)
  split = lambda y: y.reshape(*y.shape[:-1], heads, -1)
  h = _np_ln(z, p["ln_scale"], p["ln_bias"])
  o = _np_attention(split(h @ p["wq"] + p["bq"]), split(h @ p["wk"] + p["bk"]),
                    split(h @ p["wv"] + p["bv"]))
  return (z if residual else 0.0) + o.reshape(*o.shape[:-2], -1) @ p["wo"] + p["bo"]


@pytest.mark.parametrize("residual", [False, True])
def test_reference_latent_attention_block_matches_numpy_float64(residual):
  # Keys and values come from LN(z), unlike the read/write blocks' raw kv source.
  (z, p), _ = op_cases.latent_inputs(4, 2, 9, 48, 32, jnp.float32)
  out = kernels.latent_attention_block(z, p, num_heads=4, residual=residual,
                                       implementation="xla")
  op_cases.assert_close(out, _np_latent(z, p, 4, residual),
                        tol=20 * op_cases.tolerance("xla", jnp.float32), what="latent")


def test_latent_attention_block_xla_against_the_float64_oracle(float64_oracle):
  for residual in (False, True):
    op_cases.check_latent(
        lambda z, p: kernels.latent_attention_block(z, p, num_heads=4, residual=residual,
                                                    implementation="xla"),
        (2, 7, 24, 4, 24), jnp.float32, backend="xla", residual=residual)


def test_latent_attention_block_param_errors():
  key = jax.random.PRNGKey(0)
  z = jnp.zeros((1, 4, 16))
  lp = op_cases.latent_params(key, 16, 8, jnp.float32)
  with pytest.raises(ValueError, match="num_heads=3 must divide the attention width 8"):
    kernels.latent_attention_block(z, lp, num_heads=3)
  with pytest.raises(ValueError, match=r"params.wo must have shape \(8, 16\)"):
    kernels.latent_attention_block(z, lp._replace(wo=jnp.zeros((8, 15))), num_heads=2)
  with pytest.raises(ValueError, match="z must have rank 3"):
    kernels.latent_attention_block(z[0], lp, num_heads=2)
  with pytest.raises(TypeError, match="LatentAttentionParams"):
    kernels.latent_attention_block(z, dict(lp._asdict()), num_heads=2)
  with pytest.raises(TypeError, match="z must be a floating-point array"):
    kernels.latent_attention_block(z.astype(jnp.int32), lp, num_heads=2)


def _np_mlp(z, p, residual=False, branch_scale=None, dropout_rate=0.0, dropout_seed=None):
  """The latent MLP in float64 NumPy, its dropout mask from an independent uint32 NumPy
  murmur3 finaliser over the flat index (not kernels.reference's jnp code)."""
  from scipy.special import erf
  p = {k: np.asarray(v, np.float64) for k, v in p._asdict().items()}
  z = np.asarray(z, np.float64)
  h = _np_ln(z, p["ln_scale"], p["ln_bias"]) @ p["w1"] + p["b1"]
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  if dropout_rate:
    def mix(x):
      x = x ^ (x >> np.uint32(16)); x = x * np.uint32(0x85EBCA6B)
      x = x ^ (x >> np.uint32(13)); x = x * np.uint32(0xC2B2AE35)
      return x ^ (x >> np.uint32(16))
    s0, s1 = (np.uint32(v) for v in np.asarray(dropout_seed))
    with np.errstate(over="ignore"):
      idx = np.arange(h.size, dtype=np.uint32).reshape(h.shape)
      bits = mix(mix(idx * np.uint32(0x9E3779B9) + s0) ^ s1)
    thr = min(int(round((1 - dropout_rate) * 2 ** 32)), 2 ** 32 - 1)
    h = np.where(bits < np.uint32(thr), h * (2 ** 32 / thr), 0.0)
  y = h @ p["w2"] + p["b2"]
  if branch_scale is not None:
    y = y * np.asarray(branch_scale, np.float64)[:, None, None]
  return (z if residual else 0.0) + y


@pytest.mark.parametrize("train", [False, True])
def test_reference_latent_mlp_block_matches_numpy_float64(train):
  (z, p), _ = op_cases.mlp_inputs(5, 3, 9, 24, 56, jnp.float32)
  kw = op_cases.mlp_train_kw(3, rate=0.3) if train else {}
  out = kernels.latent_mlp_block(z, p, implementation="xla", **kw)
  want = _np_mlp(z, p, **kw)
  op_cases.assert_close(out, want, tol=20 * op_cases.tolerance("xla", jnp.float32),
                        what="latent_mlp")
  if train:   # one example's branch dropped: it passes z through exactly
    np.testing.assert_array_equal(np.asarray(out[-1]), np.asarray(z[-1]))
    dropped = np.mean(np.asarray(_np_mlp(z, p, dropout_rate=0.3,
                                         dropout_seed=kw["dropout_seed"]) != _np_mlp(z, p)))
    assert dropped > 0.9     # the rate changes every output (a hidden unit per row drops)


def test_latent_mlp_block_xla_against_the_float64_oracle(float64_oracle):
  for kw in ({}, dict(residual=True), op_cases.mlp_train_kw(2)):
    op_cases.check_mlp(lambda z, p: kernels.latent_mlp_block(z, p, implementation="xla", **kw),
                       (2, 7, 24, 40), jnp.float32, backend="xla", **kw)


def test_latent_mlp_block_param_errors():
  (z, p), _ = op_cases.mlp_inputs(0, 2, 4, 16, 32, jnp.float32)
  with pytest.raises(ValueError, match=r"params.w2 must have shape \(32, 16\)"):
    kernels.latent_mlp_block(z, p._replace(w2=jnp.zeros((32, 15))))
  with pytest.raises(ValueError, match="z must have rank 3"):
    kernels.latent_mlp_block(z[0], p)
  with pytest.raises(TypeError, match="LatentMLPParams"):
    kernels.latent_mlp_block(z, dict(p._asdict()))
  with pytest.raises(ValueError, match=r"branch_scale \(one scale per batch element\) must "
                     r"have shape \(2,\)"):
    kernels.latent_mlp_block(z, p, branch_scale=jnp.ones((3,)))
  with pytest.raises(ValueError, match=r"dropout_rate must be a number in \[0, 1\)"):
    kernels.latent_mlp_block(z, p, dropout_rate=1.0, dropout_seed=jnp.zeros(2, jnp.uint32))
  with pytest.raises(ValueError, match="needs dropout_seed"):
    kernels.latent_mlp_block(z, p, dropout_rate=0.1)
  with pytest.raises(ValueError, match=r"dropout_seed must be uint32\[2\]"):
    kernels.latent_mlp_block(z, p, dropout_rate=0.1, dropout_seed=jnp.zeros(3, jnp.uint32))


def test_reference_is_float64_exact_under_x64():
  with jax.enable_x64(True):
    (q, k, v), _ = op_cases.attention_inputs(3, 1, 5, 11, 2, 16, jnp.float64)
    out = reference.cross_attention(q, k, v)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, _np_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_bf16_inputs_keep_dtype():
  (q, k, v), _ = op_cases.attention_inputs(0, 1, 4, 6, 2, 8, jnp.bfloat16)
  out = kernels.cross_attention(q, k, v, implementation="xla")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), _np_attention(q, k, v), atol=2e-2)


def test_unknown_implementation_is_a_clear_error():
  q = jnp.zeros((1, 2, 1, 4))
  with pytest.raises(ValueError, match=r"implementation='flash' is unknown.*xla"):
    kernels.cross_attention(q, q, q, implementation="flash")


@pytest.mark.parametrize("args, err, msg", [
    (((1, 2, 4), (1, 2, 1, 4), (1, 2, 1, 4)), ValueError, "q must have rank 4"),
    (((1, 2, 1, 4), (1, 3, 1, 4), (1, 2, 1, 4)), ValueError, "k and v must have the same shape"),
    (((2, 2, 1, 4), (1, 3, 1, 4), (1, 3, 1, 4)), ValueError, "same batch size"),
    (((1, 2, 2, 4), (1, 3, 1, 4), (1, 3, 1, 4)), ValueError, "same number of heads"),
    (((1, 2, 1, 8), (1, 3, 1, 4), (1, 3, 1, 4)), ValueError, "same head_dim"),
    (((1, 0, 1, 4), (1, 3, 1, 4), (1, 3, 1, 4)), ValueError, "sequence length >= 1"),
])
def test_attention_shape_errors(args, err, msg):
  q, k, v = (jnp.zeros(s) for s in args)
  with pytest.raises(err, match=msg):
    kernels.cross_attention(q, k, v)


def test_attention_dtype_errors():
  q = jnp.zeros((1, 2, 1, 4))
  with pytest.raises(TypeError, match="floating-point"):
    kernels.cross_attention(q.astype(jnp.int32), q, q)
  with pytest.raises(TypeError, match="share one dtype"):
    kernels.cross_attention(q, q.astype(jnp.bfloat16), q)


def test_block_param_errors():
  key = jax.random.PRNGKey(0)
  z, x = jnp.zeros((1, 4, 16)), jnp.zeros((1, 6, 8))
  rp = op_cases.read_params(key, 16, 8, 8, jnp.float32)
  with pytest.raises(ValueError, match="num_heads=3 must divide the attention width 8"):
    kernels.read_block(z, x, rp, num_heads=3)
  with pytest.raises(ValueError, match=r"params.wk must have shape \(8, 8\)"):
    kernels.read_block(z, x, rp._replace(wk=jnp.zeros((9, 8))), num_heads=2)
  with pytest.raises(ValueError, match="same batch size"):
    kernels.read_block(z, jnp.zeros((2, 6, 8)), rp, num_heads=2)
  with pytest.raises(TypeError, match="ReadBlockParams"):
    kernels.read_block(z, x, dict(rp._asdict()), num_heads=2)
  wp = op_cases.write_params(key, 8, 16, 8, 16, jnp.float32)
  with pytest.raises(ValueError, match=r"write_block: params.w2 must have shape"):
    kernels.write_block(x, z, wp._replace(w2=jnp.zeros((3, 8))), num_heads=2)


def test_dispatch_lists_and_defaults():
  assert "xla" in kernels.available_implementations()
  assert kernels.default_implementation("cpu") == "xla"
  assert kernels.resolve_implementation(None) in kernels.IMPLEMENTATIONS
  # TPU: XLA until a tpu_static table shows a kernel winning (kernels.api docstring).
  assert kernels.default_implementation("tpu") == "xla"


def test_reference_softmax_matches_jax_nn_softmax_forward_and_backward():
  # reference.softmax avoids the divide form (see its docstring); it must stay softmax.
  s = jax.random.normal(jax.random.PRNGKey(3), (3, 5, 37)) * 4.0
  w = jax.random.normal(jax.random.PRNGKey(4), s.shape)
  np.testing.assert_allclose(reference.softmax(s), jax.nn.softmax(s, -1), rtol=1e-6, atol=1e-7)
  g_ref = jax.grad(lambda s: jnp.sum(jax.nn.softmax(s, -1) * w))(s)
  g = jax.grad(lambda s: jnp.sum(reference.softmax(s) * w))(s)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
  s64 = np.asarray(s, np.float64)
  e = np.exp(s64 - s64.max(-1, keepdims=True))
  with jax.enable_x64():
    np.testing.assert_allclose(reference.softmax(jnp.asarray(s64)), e / e.sum(-1, keepdims=True),
                               rtol=1e-13)


def test_reference_gelu_is_the_exact_erf_gelu_forward_and_backward():
  # reference.gelu uses the erf form (cheaper on XLA:CPU than jax.nn.gelu's erfc form); it
  # must stay the exact GELU x * Phi(x), not the tanh approximation.
  import math
  x64 = np.linspace(-12.0, 12.0, 20001)
  phi = 0.5 * np.array([math.erfc(-t / math.sqrt(2.0)) for t in x64])
  pdf = np.exp(-0.5 * x64 ** 2) / math.sqrt(2.0 * math.pi)
  with jax.enable_x64():
    y = reference.gelu(jnp.asarray(x64))
    g = jax.vmap(jax.grad(reference.gelu))(jnp.asarray(x64))
  np.testing.assert_allclose(y, x64 * phi, rtol=1e-13, atol=1e-15)
  np.testing.assert_allclose(g, phi + x64 * pdf, rtol=1e-12, atol=1e-15)
  x32 = jnp.asarray(x64, jnp.float32)
  np.testing.assert_allclose(reference.gelu(x32), x64 * phi, rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(reference.gelu))(x32), phi + x64 * pdf,
                             rtol=1e-5, atol=1e-6)
  # tanh GELU differs from the exact one by up to ~5e-4: far outside these tolerances.
  assert np.max(np.abs(np.asarray(jax.nn.gelu(x32, approximate=True)) - x64 * phi)) > 1e-4
  xb = x32.astype(jnp.bfloat16)
  assert reference.gelu(xb).dtype == jnp.bfloat16


def test_precision_policy_of_the_xla_path():
  """The "xla" implementation runs XLA's default precision (TF32 for fp32 on GPU), as a
  plain XLA model does; precision="highest" asks for exact dots; anything else raises."""
  q = jnp.zeros((1, 8, 2, 16), jnp.float32)
  jp = lambda **kw: str(jax.make_jaxpr(lambda a: kernels.cross_attention(
      a, a, a, implementation="xla", **kw))(q))
  assert "HIGHEST" not in jp() and "HIGHEST" in jp(precision="highest")
  with pytest.raises(ValueError, match="precision"):
    kernels.cross_attention(q, q, q, implementation="xla", precision="tf32x3")


def test_gpu_default_is_measured_per_shape_class(monkeypatch):
  from kernels import api
  from kernels.triton_gpu import autotune_table
  monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
  q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
  key = api.shape_class("attention", q, q)
  assert key == "attention:8x2x16x8x2x16:bfloat16"
  monkeypatch.setattr(autotune_table, "WINS", {})
  assert api.resolve_implementation(None, key) == "xla"        # nothing measured
  monkeypatch.setattr(autotune_table, "WINS", {key: dict(triton_us=1.0, xla_us=2.0)})
  assert api.resolve_implementation(None, key) == "triton"     # measured faster
  assert api.resolve_implementation(None, "attention:other:bfloat16") == "xla"
  monkeypatch.setattr(autotune_table, "WINS", {key: dict(triton_us=3.0, xla_us=2.0)})
  assert api.resolve_implementation(None, key) == "xla"        # measured slower
  assert api.resolve_implementation("triton", key) == "triton"  # explicit always runs


def test_tpu_default_is_chosen_per_shape_class_by_the_cost_table(monkeypatch):
  # Same WINS rule as the GPU's, over kernels/pallas_tpu/cost_table.py (bench.tpu_static
  # --write-wins): the kernels only for a class whose estimate beats XLA's.
  from kernels import api
  from kernels.pallas_tpu import cost_table
  monkeypatch.setattr(api.jax, "default_backend", lambda: "tpu")
  q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
  key = api.shape_class("attention", q, q)
  monkeypatch.setattr(cost_table, "WINS", {})
  assert api.resolve_implementation(None, key) == "xla"             # nothing estimated
  assert api.resolve_implementation(None) == "xla"                  # no class: xla
  monkeypatch.setattr(cost_table, "WINS", {key: dict(pallas_tpu_us=1.0, xla_us=2.0)})
  assert api.resolve_implementation(None, key) == "pallas_tpu"      # estimated faster
  assert api.resolve_implementation(None, "read:other:bfloat16") == "xla"
  monkeypatch.setattr(cost_table, "WINS", {key: dict(pallas_tpu_us=3.0, xla_us=2.0)})
  assert api.resolve_implementation(None, key) == "xla"             # estimated slower
  assert api.resolve_implementation("pallas_tpu", key) == "pallas_tpu"  # explicit runs
  # The committed table: every row has both estimates.
  for row in cost_table.WINS.values():
    assert row["pallas_tpu_us"] > 0 and row["xla_us"] > 0


def test_tpu_default_of_a_model_follows_the_cost_table(monkeypatch):
  # Through the model: a class marked as a win dispatches to the pallas_tpu module.
  from kernels import api
  from kernels.pallas_tpu import cost_table
  import kernels.pallas_tpu as P
  monkeypatch.setattr(api.jax, "default_backend", lambda: "tpu")
  q = jnp.zeros((1, 8, 2, 16), jnp.float32)
  key = api.shape_class("attention", q, q)
  calls = []
  monkeypatch.setattr(P, "cross_attention", lambda *a, **k: calls.append(1) or a[0])
  monkeypatch.setattr(cost_table, "WINS", {key: dict(pallas_tpu_us=1.0, xla_us=2.0)})
  kernels.cross_attention(q, q, q)
  assert calls == [1]
  monkeypatch.setattr(cost_table, "WINS", {key: dict(pallas_tpu_us=3.0, xla_us=2.0)})
  kernels.cross_attention(q, q, q)
  assert calls == [1]
