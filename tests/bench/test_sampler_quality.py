"""bench.sampler_quality: aggregation and outputs (fast), and a tiny end-to-end run (slow)."""
import json
import os

import pytest

from bench import sampler_quality as sq


def _rows():
  rows = []
  for seed, fd in ((0, 10.0), (1, 14.0)):
    for s, n in (("ddpm", 10), ("dpmpp_2m", 10), ("dpmpp_2m", 20)):
      rows.append(dict(model="plain", guidance=0.0, sampler=s, steps=n, seed=seed,
                       digits_fd=fd * (2 if s == "ddpm" else 1), digits_label_accuracy=0.5))
  return rows


def test_summary_is_mean_and_std_over_seeds():
  summ = {(r["sampler"], r["steps"]): r for r in sq.summarize(_rows())}
  r = summ[("ddpm", 10)]
  assert r["seeds"] == 2 and r["digits_fd"] == 24.0 and r["digits_fd_std"] == 4.0
  assert summ[("dpmpp_2m", 20)]["digits_label_accuracy"] == 0.5
  assert "fid" not in r


def test_outputs_json_markdown_png(tmp_path):
  from bench import timing
  rows = _rows()
  rec = dict(environment=timing.environment(), command="x", num_samples=8, seeds=[0, 1],
             rows=rows, summary=sq.summarize(rows))
  files = sq.write_outputs(rec, str(tmp_path))
  md = open(files["md"]).read()
  assert "| plain w=0 | ddpm | 10 | 24 ± 4" in md
  assert json.load(open(files["json"]))["summary"][0]["seeds"] == 2
  assert os.path.getsize(files["png"]) > 1000


def test_bad_arguments():
  with pytest.raises(ValueError, match="--steps must list integers >= 1"):
    sq._ints("0,10", "steps")
  with pytest.raises(ValueError, match="comma-separated integers"):
    sq._ints("ten", "steps")


@pytest.mark.slow
def test_end_to_end_on_a_tiny_checkpoint(tmp_path):
  from rin import loop
  from tests.rin.tiny import tiny_config
  cfg = tiny_config(num_steps=2, checkpoint_every=2, tensorboard=False)
  loop.train(cfg, str(tmp_path / "plain"), progress=False)
  cfg.diffusion.cond_dropout = 0.1
  loop.train(cfg, str(tmp_path / "cfg"), progress=False)
  rec = sq.run(str(tmp_path / "plain"), workdir_guided=str(tmp_path / "cfg"),
               samplers=["ddim", "dpmpp_2m"], steps=[2], seeds=[0], guidance=[1.0],
               num_samples=8, batch_size=8, out=str(tmp_path / "out"), progress=False)
  assert len(rec["rows"]) == 2 + 4 and all("digits_fd" in r for r in rec["rows"])
  assert {r["guidance"] for r in rec["rows"] if r["model"] == "guided"} == {0.0, 1.0}
  with pytest.raises(ValueError, match="trained without label dropout"):
    sq.run(str(tmp_path / "plain"), workdir_guided=str(tmp_path / "plain"), steps=[2],
           seeds=[0], num_samples=8, progress=False)
