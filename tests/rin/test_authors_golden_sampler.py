"""The samplers against golden values recorded once from the authors' TensorFlow code
(google-research/pix2seq @ eabd4e9: image_diffusion_model.Model.sample ->
diffusion_utils.Scheduler.generate / transition_step / get_x0_eps; how: tests/data/README.md).

Eight cases of five steps each: DDPM ("large" variance) and DDIM, the authors' `td` (1 and
0.5 steps), eps / x / v predictions, schedules cosine, cosine@0.2,1,1 and sigmoid@-3,3,0.9,
and two class-conditional cases with classifier-free guidance (1.5 and 3). The denoiser is a
tiny deterministic function of (x_t, gamma, carried latents, class) whose weights are stored
with the numbers, so the loop carries real latents from step to step.

Tolerances: |ours - theirs| <= 2e-5 * max(1, max|theirs|) per tensor, plus, for DDPM, the
rounding its ill-conditioned first step may leave (_ddpm_rounding). The two sides evaluate
the same float32 expressions in a different order (their 1/sqrt(g) * (...) against our
(...) / sqrt(g), their log/exp form of alpha against our ratio, XLA's cos/sigmoid against
Eigen's); measured: <= 1e-6 everywhere except the DDPM trajectories out of gamma(1) = 6e-9,
up to 4.5e-4 there (allowance 4e-3 to 1.2e-2). A wrong coefficient, a swapped gamma or a shifted time moves
these values by O(0.01 - 1).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rin import diffusion

GOLDEN = __file__.rsplit("/", 2)[0] + "/data/authors_golden_sampler.npz"
TOL = 2e-5
EPS32 = float(np.finfo(np.float32).eps)
TARGET = {"eps": "eps", "x": "x0", "v": "v"}     # their pred_type -> our target


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as d:
    return {k: d[k] for k in d.files}


def _cases(golden):
  return {str(name): dict(zip(("sampler", "schedule", "td", "pred_type", "guidance"), spec))
          for name, spec in zip(golden["sampler/cases"], golden["sampler/case_specs"])}


def _case(golden, name):
  pre = f"sampler/{name}/"
  return {k[len(pre):]: v for k, v in golden.items() if k.startswith(pre)}


CASES = ["ddpm_cosine_td0_eps", "ddpm_cosine_td1_eps", "ddpm_cosinetau_td0_v",
         "ddim_cosine_td0_eps", "ddim_sigmoid_td0.5_eps", "ddim_cosine_td0_x",
         "ddpm_cosine_td0_eps_cfg1.5", "ddim_cosine_td1_v_cfg3"]
GUIDED = [c for c in CASES if "cfg" in c]


def _close(ours, theirs, what, allowance=0.0):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
  err = float(np.max(np.abs(ours - theirs)))
  bound = TOL * max(1.0, float(np.max(np.abs(theirs)))) + allowance
  assert err <= bound, f"{what}: max|ours - theirs| = {err:.3g} > {bound:.3g}"
  return err


def _ddpm_rounding(sampler, x_t, gamma_now, gamma_next):
  """The float32 rounding a DDPM step may legitimately leave, |x_t| ulps times its
  amplification 1/sqrt(alpha) (alpha = gamma_now / gamma_next): the step forms
  x_t - (1 - alpha)/sqrt(1 - gamma) eps, a difference of nearly equal numbers when gamma_now
  is ~0 (the first step, gamma(1) = 6e-9 for "cosine"), and divides it by sqrt(alpha)
  (~4e3 from t = 1 to t = 0.8). Their own float32 run is 6e-4 from a float64 evaluation of
  that step; two float32 evaluations in a different operation order (XLA's fused scan
  body, TF's eager ops) differ by up to 4.5e-4 there. 4 ulps covers it; elsewhere 1/sqrt(alpha)
  <= 2 and this adds < 1e-6. DDIM has no such step (x0 is clipped before it re-noises)."""
  if sampler != "ddpm":
    return 0.0
  amp = float(np.max(np.sqrt(np.asarray(gamma_next, np.float64)
                             / np.asarray(gamma_now, np.float64))))
  return 4.0 * EPS32 * float(np.max(np.abs(x_t))) * amp


def _denoiser(golden, pred_type):
  """The recording's tiny denoiser (weights from the file), in JAX: (x, gamma [B], z[,
  labels]) -> (pred, z'). z' = tanh(z A + mean_hw(x) P + g c + b [+ onehot K]);
  h = tanh(mean_m(z') O + x U + g u [+ onehot L]); pred = the exact prediction for
  Gaussian data N(0, S2) of x, + 0.2 h."""
  w = {k.split("/")[-1]: jnp.asarray(v) for k, v in golden.items()
       if k.startswith("sampler/weights/")}
  s2, num_classes = float(golden["sampler/hparams"][6]), int(golden["sampler/hparams"][7])

  def f(x, g, z, labels=None):
    g3, g4 = g[:, None, None], g[:, None, None, None]
    pooled = jnp.mean(x, axis=(1, 2))
    pre_z = (jnp.einsum("bmd,de->bme", z, w["A"]) + (pooled @ w["P"])[:, None, :]
             + g3 * w["c"] + w["b"])
    # their class input: one-hot labels, all zeros for the dropped label (ours NULL_LABEL)
    cond = None if labels is None else jax.nn.one_hot(labels, num_classes)
    if cond is not None:
      pre_z = pre_z + (cond @ w["K"])[:, None, :]
    z_new = jnp.tanh(pre_z)
    pre_h = ((jnp.mean(z_new, axis=1) @ w["O"])[:, None, None, :]
             + jnp.einsum("bhwc,ce->bhwe", x, w["U"]) + g4 * w["u"])
    if cond is not None:
      pre_h = pre_h + (cond @ w["L"])[:, None, None, :]
    h = jnp.tanh(pre_h)
    v = g4 * s2 + (1.0 - g4)
    eps_lin = jnp.sqrt(1.0 - g4) / v * x
    x0_lin = jnp.sqrt(g4) * s2 / v * x
    base = {"eps": eps_lin, "x": x0_lin,
            "v": jnp.sqrt(g4) * eps_lin - jnp.sqrt(1.0 - g4) * x0_lin}[pred_type]
    return base + 0.2 * h, z_new
  return f


def test_golden_file_holds_every_case(golden):
  assert str(golden["meta/authors_commit"]) == "eabd4e9"
  assert sorted(_cases(golden)) == sorted(CASES)
  tf_version, _, py = (str(v) for v in golden["versions"])
  assert tf_version.startswith("2.") and py.startswith("3.11")


@pytest.mark.parametrize("name", CASES)
def test_the_denoiser_reimplementation_is_theirs(golden, name):
  """Not a library test: the JAX copy of the recording's toy denoiser must give their
  predictions and latents from their inputs, or the sampler tests below compare nothing."""
  c, spec = _case(golden, name), _cases(golden)[name]
  f = jax.jit(_denoiser(golden, spec["pred_type"]))
  labels = c.get("labels")
  for i in range(c["x_in"].shape[0]):
    pred, z = f(c["x_in"][i], c["gamma"][i], c["z_in"][i], labels)
    _close(pred, c["pred"][i], f"{name} step {i} pred")
    _close(z, c["z_out"][i], f"{name} step {i} latents")
    if labels is not None:
      pred, _ = f(c["x_in"][i], c["gamma"][i], c["z_in"][i],
                  np.full_like(labels, diffusion.NULL_LABEL))
      _close(pred, c["pred_uncond"][i], f"{name} step {i} unconditional pred")


@pytest.mark.parametrize("name", CASES)
def test_each_step_matches_the_authors_transition(golden, name):
  """From their x_t, the (guided) prediction their step used and (gamma_now, gamma_next) at
  every step: our x0/eps (clipped, eps made consistent) and our ddpm_step / ddim_step give
  their x0, eps and x_{t-1} (DDPM with the step's recorded noise)."""
  c, spec = _case(golden, name), _cases(golden)[name]
  for i in range(c["x_t"].shape[0]):
    g, gn = jnp.asarray(c["gamma_now"][i]), jnp.asarray(c["gamma_next"][i])
    x_t = jnp.asarray(c["x_t"][i])
    x0, eps = diffusion.prediction_to_x0_eps(TARGET[spec["pred_type"]], c["pred_guided"][i],
                                             x_t, g)
    _close(x0, c["x0"][i], f"{name} step {i} x0")
    _close(eps, c["eps"][i], f"{name} step {i} eps")
    if spec["sampler"] == "ddpm":
      x_next = diffusion.ddpm_step(x_t, x0, eps, g, gn, jnp.asarray(c["noise"][i + 1]))
    else:
      x_next = diffusion.ddim_step(x_t, x0, eps, g, gn)
    _close(x_next, c["x_next"][i], f"{name} step {i} x_next",
           _ddpm_rounding(spec["sampler"], x_t, g, gn))


def _bits(key):
  return key if key.dtype == jnp.uint32 else jax.random.key_data(key)


def _recorded_normal(rng, noise, num_steps):
  """A stand-in for jax.random.normal inside diffusion.sample: the key sample() draws x_T
  from returns their x_T, the key of step i (fold_in(rng_steps, i)) their step-i noise.
  Keys are matched by value, so it works on traced keys inside the scan."""
  rng_init, rng_steps = jax.random.split(rng)
  keys = [rng_init] + [jax.random.fold_in(rng_steps, i) for i in range(num_steps)]
  table = jnp.stack([_bits(k) for k in keys])
  # ddim draws only x_T: the other rows are never matched.
  values = jnp.asarray(np.concatenate(
      [noise, np.zeros((num_steps + 1 - noise.shape[0],) + noise.shape[1:], noise.dtype)]))

  def normal(key, shape, dtype=jnp.float32):
    assert tuple(shape) == values.shape[1:], shape
    hit = jnp.all(_bits(key)[None] == table, axis=-1).astype(values.dtype)
    return jnp.tensordot(hit, values, axes=1).astype(dtype)
  return normal


@pytest.mark.parametrize("name", CASES)
def test_sample_reproduces_the_authors_loop(golden, name, monkeypatch):
  """diffusion.sample, fed their x_T and DDPM noises, walks their trajectory: at every step
  the network sees their x_t, gamma and carried latents (zeros at the first), and the
  returned x0 is theirs. Guided cases: their labels and guidance weight; both halves of our
  one batched call read the conditional branch's carried latents (guidance_latents
  "shared", as their loop)."""
  c, spec = _case(golden, name), _cases(golden)[name]
  n = c["x_in"].shape[0]
  rng = jax.random.PRNGKey(11)
  monkeypatch.setattr(jax.random, "normal", _recorded_normal(rng, c["noise"], n))
  f, seen = _denoiser(golden, spec["pred_type"]), []
  labels, w = c.get("labels"), float(spec["guidance"])
  b = c["x_in"].shape[1]

  def denoise(x, g, z, *lab):
    def record(*a):
      a = [np.asarray(v) for v in a]
      if labels is not None:     # [conditional half; unconditional half]
        np.testing.assert_array_equal(a[3], np.concatenate(
            [labels, np.full_like(labels, diffusion.NULL_LABEL)]))
        for v in a[:3]:
          np.testing.assert_array_equal(v[:b], v[b:])
      seen.append([v[:b] for v in a[:3]])
    jax.debug.callback(record, x, g, z, *lab, ordered=True)
    return f(x, g, z, *lab)

  x0 = diffusion.sample(denoise, rng, c["x_in"].shape[1:], num_steps=n,
                        schedule=spec["schedule"], sampler=spec["sampler"],
                        target=TARGET[spec["pred_type"]], latent_shape=c["z_in"].shape[1:],
                        time_delay=float(spec["td"]), labels=labels, guidance=w)
  jax.effects_barrier()
  assert len(seen) == n
  _close(seen[0][0], c["noise"][0], f"{name} x_T")
  assert not np.any(seen[0][2]), "the first step's latents must be zeros"
  # The first step's rounding (see _ddpm_rounding) carries into the later steps, which
  # contract it (1/sqrt(alpha) <= 2 and the x0 weight shrinks): measured 4.5e-4 after step 0,
  # 9e-5 at the last, so the first step's allowance bounds the whole trajectory.
  slack = _ddpm_rounding(spec["sampler"], c["x_t"][0], c["gamma_now"][0], c["gamma_next"][0])
  for i, (x, g, z) in enumerate(seen):
    _close(x, c["x_in"][i], f"{name} step {i} x_t", slack)
    _close(g, c["gamma"][i], f"{name} step {i} gamma")
    _close(z, c["z_in"][i], f"{name} step {i} carried latents", slack)
  _close(x0, c["x0_final"], f"{name} returned x0", slack)
  _close((np.asarray(x0) + 1.0) / 2.0, c["samples01"], f"{name} their [0, 1] samples", slack)
