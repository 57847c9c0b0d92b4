"""Entry point of every Bazel py_test (see the top-level BUILD).

Bazel runs `<venv python> tests/bazel_pytest_main.py <path/to/test_file.py>` with
the working directory at the root of the test's runfiles tree (a mirror of the
repository). This runs pytest on that one file and exits with pytest's status.
It is not a pytest test itself (its name does not match test_*.py).
"""
import os
import sys


def _pytest_args(argv):
    if not argv:
        raise SystemExit("usage: bazel_pytest_main.py TEST_FILE [pytest args...]")
    test_file, extra = argv[0], list(argv[1:])
    args = [
        test_file,
        "-rfE",                    # summarise failures and errors at the end
        "-v",
    ]
    tmp = os.environ.get("TEST_TMPDIR")
    if tmp:  # the runfiles tree is not ours to write into
        args += ["-o", "cache_dir=" + os.path.join(tmp, ".pytest_cache")]
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        args += ["--junitxml", xml]
    # `bazel test --test_filter=EXPR` arrives here; hand it to pytest as -k.
    test_filter = os.environ.get("TESTBRIDGE_TEST_ONLY")
    if test_filter:
        args += ["-k", test_filter]
    return args + extra


def _drop_source_tree_from_path():
    """Import project code only from the runfiles tree, which holds exactly the
    files the BUILD declares. Python puts the *resolved* directory of this
    script (the source checkout's tests/) on sys.path; remove it, so a test
    helper missing from the BUILD fails under Bazel instead of being found."""
    runfiles = os.environ.get("TEST_SRCDIR")
    if not runfiles:
        return
    here = os.path.dirname(os.path.realpath(__file__))
    runfiles = os.path.realpath(runfiles)
    if not here.startswith(runfiles + os.sep):
        sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != here]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    tmp = os.environ.get("TEST_TMPDIR")
    if tmp:
        # Keep hypothesis' example database, matplotlib's cache and anything
        # else written under $HOME out of the runfiles tree (Bazel 4 leaves
        # HOME unset).
        os.environ.setdefault("HOME", tmp)
        os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tmp, ".hypothesis"))
        os.environ.setdefault("MPLCONFIGDIR", os.path.join(tmp, "matplotlib"))
    # Up to two test processes may share one GPU (.bazelrc --local_test_jobs):
    # don't let the first one grab most of its memory.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    _drop_source_tree_from_path()
    try:
        import jax  # noqa: F401  (the project's core dependency: proves the venv)
        import pytest
    except ImportError as e:
        raise SystemExit(
            f"bazel_pytest_main: {sys.executable} is not the project's venv python ({e}). Run Bazel "
            "with the project's venv python: bazel test --python_path=$PWD/.venv/bin/python "
            "//... (or .ci/bazel_test.sh)") from e

    return pytest.main(_pytest_args(argv))


if __name__ == "__main__":
    sys.exit(main())
