"""The command lines' process setup: quiet library logs with --verbosity to bring them back;
no process-wide setting (XLA_FLAGS, malloc, parsed absl flags) changed by importing the
library."""
import os
import re
import subprocess
import sys

from tests.rin import subproc

TIMEOUT = 480
# absl's log prefix: "I1203 08:34:20.123456 140234 checkpoint_manager.py:123] ...".
_INFO = re.compile(r"^I\d{4} [\d:.]+\s+\d+ ([^:\s]+):\d+\]")
_RIN_FILES = set(os.listdir(os.path.join(subproc.REPO, "rin")))


def _train(workdir, log, cache_dir, *extra) -> str:
  args = ["-m", "rin.train", "--config", "tests/rin/tiny_cli_config.py", "--workdir",
          str(workdir), "--noprogress", "--config.model.num_blocks=1",
          "--config.train.checkpoint_every=2", *extra]
  p = subproc.start(args, log, env=subproc.env(cache_dir))
  assert subproc.wait_all([p], TIMEOUT) == [0], subproc.tail(log)
  with open(log) as f:
    return f.read()


def _info_files(out: str) -> set:
  return {m.group(1) for m in map(_INFO.match, out.splitlines()) if m}


def test_cli_prints_only_its_own_info_lines_unless_verbosity_is_given(tmp_path):
  cache = tmp_path / "cache"
  out = _train(tmp_path / "w", tmp_path / "a.log", cache, "--config.train.num_steps=2")
  assert _info_files(out) <= _RIN_FILES, out          # no orbax / absl INFO chatter
  # --verbosity=0 (absl's flag) brings the libraries' INFO logs back; our events stay.
  out = _train(tmp_path / "w", tmp_path / "b.log", cache, "--config.train.num_steps=4",
               "--verbosity=0")
  assert "resumed from step 2" in out, out
  assert _info_files(out) - _RIN_FILES, out           # e.g. orbax's checkpoint manager


_IMPORT_CODE = """
import os
from absl import flags
import rin.checkpoint, rin.data, rin.evaluation, rin.images, rin.loop, rin.sample, rin.sampling
import rin.train, rin.train_state, rin.train_step, rin.video, rin.visualize
from rin import xla_cpu
ds = rin.data.load_dataset("digits", image_size=8)
it = rin.data.make_train_iterator(ds, batch_size=8, seed=0, random_flip=False, worker_count=1)
next(it)
print(os.environ.get("XLA_FLAGS", "<unset>"), xla_cpu.freed_memory_kept(),
      flags.FLAGS.is_parsed())
"""


def test_importing_the_library_changes_no_process_setting():
  # A main guard: grain's worker processes import the main module again.
  code = "def main():\n" + "".join(f"  {l}\n" for l in _IMPORT_CODE.strip().splitlines()) + \
      "if __name__ == '__main__':\n  main()\n"
  env = subproc.env()
  out = subprocess.run([sys.executable, "-c", code], cwd=subproc.REPO, env=env, check=True,
                       capture_output=True, text=True, timeout=TIMEOUT).stdout.split()
  assert out == ["<unset>", "False", "False"]
