#!/usr/bin/env bash
# Runs the project's tests under Bazel, fully offline.
#
# usage: .ci/bazel_test.sh [PYTHON] [BAZEL_TEST_ARGS_OR_TARGETS...]
#   PYTHON   the project's virtualenv interpreter (default: .venv/bin/python);
#            tests import jax, flax, pytest, ... from its site-packages.
#   further arguments go to `bazel test` (default target pattern: //...).
# environment:
#   BAZEL_TEST_TIMEOUT   overall limit in seconds for `bazel test` (default 5400)
#   BAZEL_APT_TIMEOUT    limit in seconds for apt-get (default 900)
#   BAZEL_TEST_JOBS      parallel test processes (default 2 on CPU, 1 when an
#                        accelerator is visible: two processes cannot share a TPU)
#
# Needs Debian's bazel-bootstrap (Bazel 4.2.3) and bazel-bootstrap-source (its
# /usr/src/bazel-bootstrap/mock_repos/ stands in for rules_cc, rules_java and
# platforms, see WORKSPACE); installs both with apt-get when missing.
# Exit status: 0 all tests passed; otherwise non-zero with a message on stderr.
set -u -o pipefail

die() { echo "bazel_test.sh: FAIL: $*" >&2; exit 1; }
note() { echo "bazel_test.sh: $*" >&2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || die "cannot find the repository root"
cd "$ROOT" || die "cannot cd to $ROOT"

PY="${1:-.venv/bin/python}"
[ $# -gt 0 ] && shift
# Absolute, but NOT symlink-resolved: a venv's bin/python is a symlink, and the
# interpreter finds the venv's site-packages only when started through it.
case "$PY" in
  /*) ;;
  *) PY="$ROOT/$PY" ;;
esac
[ -x "$PY" ] || die "python interpreter '$PY' is missing or not executable (pass the venv's python as \$1)"
timeout 120 "$PY" -c "import pytest, jax" >/dev/null 2>&1 \
  || die "'$PY' cannot import pytest and jax; pass the project's venv python as \$1"

# The top-level BUILD globs every file under these directories; a nested BUILD
# file would silently cut its directory out of those globs.
nested="$(find kernels rin bench tests \( -name BUILD -o -name BUILD.bazel \) -print 2>/dev/null)"
[ -z "$nested" ] || die "nested BUILD files found (all targets live in the top-level BUILD, whose globs they would break): $nested"

MOCK=/usr/src/bazel-bootstrap/mock_repos
have_bazel() {
  command -v bazel >/dev/null 2>&1 \
    && [ -d "$MOCK/rules_cc" ] && [ -d "$MOCK/rules_java" ] && [ -d "$MOCK/platforms" ]
}
if ! have_bazel; then
  note "installing bazel-bootstrap and bazel-bootstrap-source with apt-get"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 && SUDO="sudo -n" \
      || die "bazel-bootstrap is not installed and we are not root (run: apt-get install -y bazel-bootstrap bazel-bootstrap-source)"
  fi
  command -v apt-get >/dev/null 2>&1 || die "bazel-bootstrap is not installed and apt-get is not available"
  APT_T="${BAZEL_APT_TIMEOUT:-900}"
  export DEBIAN_FRONTEND=noninteractive
  if ! timeout "$APT_T" $SUDO apt-get install -y -q bazel-bootstrap bazel-bootstrap-source >&2; then
    timeout "$APT_T" $SUDO apt-get update -q >&2 || note "apt-get update failed"
    timeout "$APT_T" $SUDO apt-get install -y -q bazel-bootstrap bazel-bootstrap-source >&2 \
      || die "apt-get install -y bazel-bootstrap bazel-bootstrap-source failed (or timed out after ${APT_T}s)"
  fi
  have_bazel || die "bazel-bootstrap installed, but 'bazel' or $MOCK/{rules_cc,rules_java,platforms} is still missing"
fi

if [ -n "${BAZEL_TEST_JOBS:-}" ]; then
  JOBS="$BAZEL_TEST_JOBS"
elif ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1 \
    || { command -v nvidia-smi >/dev/null 2>&1 && timeout 30 nvidia-smi -L >/dev/null 2>&1; }; then
  JOBS=1
else
  JOBS=2
fi

# Default target pattern when only flags (or nothing) were given.
has_target=0
for a in "$@"; do
  case "$a" in -*) ;; *) has_target=1 ;; esac
done
[ "$has_target" = 1 ] || set -- "$@" //...

T="${BAZEL_TEST_TIMEOUT:-5400}"
note "bazel test (Bazel $(timeout 120 bazel --version 2>/dev/null | head -1), python $PY, $JOBS test jobs, limit ${T}s): $*"
start=$(date +%s)
# SIGINT makes the Bazel client cancel the build in its server cleanly; a
# client that ignores it is killed 60 s later.
timeout --signal=INT --kill-after=60 "$T" \
  bazel test --python_path="$PY" --local_test_jobs="$JOBS" --keep_going "$@"
rc=$?
elapsed=$(( $(date +%s) - start ))

case "$rc" in
  0) note "PASS: all tests passed (${elapsed}s)"; exit 0 ;;
  124|137|8)
    note "FAIL: bazel test timed out or was interrupted after ${elapsed}s (limit ${T}s); stopping the Bazel server"
    timeout 120 bazel shutdown >/dev/null 2>&1
    exit 1 ;;
  3) die "some tests failed (${elapsed}s); see the logs above and bazel-testlogs/<target>/test.log" ;;
  4) die "bazel found no test targets (no tests/**/test_*.py?)" ;;
  1) die "build or analysis failed (${elapsed}s); see the errors above" ;;
  *) die "bazel test exited with status $rc after ${elapsed}s" ;;
esac
