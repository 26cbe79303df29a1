"""Every way a newcomer can misuse the ``neuroprobe`` command ends in one line on stderr and exit 2.

All cases run the real command in a subprocess.  Ctrl-C is a real SIGINT sent to the
subprocess, at start-up (while torch loads) and in the middle of a recording.  The slow
test installs the lowest typer that ``pyproject.toml`` allows into a scratch folder and
runs the usage cases again against it.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: (arguments, a fragment the one line must contain)
USAGE_ERRORS = [
    pytest.param([], "no command given", id="no-arguments"),
    pytest.param(["record"], "--model", id="record-missing-model"),
    pytest.param(["figures", "REC.h5", "--out", "D"], "--cells", id="figures-missing-cells"),
    pytest.param(["cells"], "RECORDING", id="cells-missing-argument"),
    pytest.param(["record", "--model", "organism", "--bogus"], "--bogus", id="unknown-option"),
    pytest.param(["record", "--model", "organism", "--batch-size", "abc"], "--batch-size", id="not-an-integer"),
    pytest.param(["recrod"], "record", id="misspelled-command"),
    pytest.param(["subjects", "no-such-subject"], "unknown subject", id="neuroprobe-error"),
    pytest.param(["lesion", "--model", "organism", "--cells", "missing.csv", "--concept", "seven"], "does not exist",
                 id="lesion-missing-cells-table"),
]

HEAVY = ("torch", "transformers", "pandas", "seaborn", "matplotlib", "scipy", "h5py", "sklearn")


def _env(extra_path: str | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    paths = [p for p in (extra_path, str(ROOT), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _run(args: list[str], cwd: Path, extra_path: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuroprobe.cli", *args], cwd=cwd, env=_env(extra_path),
                          capture_output=True, text=True, timeout=300)


def _check_usage_error(proc: subprocess.CompletedProcess, args: list[str], fragment: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert len(lines) == 1, f"{args}: expected one line on stderr, got {proc.stderr!r}"
    assert lines[0].startswith("neuroprobe: error: "), lines[0]
    assert fragment in lines[0], (fragment, lines[0])
    if not args:  # no arguments: the help first, on stdout
        assert "Usage: neuroprobe" in proc.stdout and "record" in proc.stdout, proc.stdout


@pytest.mark.parametrize("args,fragment", USAGE_ERRORS)
def test_usage_error_is_one_line_and_exit_2(args, fragment, tmp_path):
    _check_usage_error(_run(args, tmp_path), args, fragment)


def test_help_is_plain_and_loads_nothing_heavy(tmp_path):
    """``--help`` of the app and of each command needs typer only (that is what keeps it fast)."""
    code = (
        "import sys\n"
        "from neuroprobe.cli import main\n"
        "for args in (['--help'], ['record', '--help'], ['cells', '--help'], ['lesion', '--help'], ['subjects', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), (args, e.code)\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout.splitlines()[-1]
    # the usage line names the argument as a plain placeholder, not typer's "{recording}"
    assert re.search(r"Usage: neuroprobe cells \[OPTIONS\] RECORDING\b", proc.stdout), proc.stdout
    # every help line is printed whole (no rich box that cuts text at the terminal width)
    assert "╭" not in proc.stdout and "…" not in proc.stdout
    assert "recordings/<subject>_<battery>_<montage>.h5" in proc.stdout.replace("\n", " ").replace("  ", "")


def _sigint_popen(args: list[str], cwd: Path) -> subprocess.Popen:
    # a shell without job control starts background children with SIGINT ignored: restore the default
    return subprocess.Popen([sys.executable, "-m", "neuroprobe.cli", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not condition():
        assert proc.poll() is None, f"the command ended before the interrupt: {proc.communicate()}"
        assert time.monotonic() - t0 < timeout, "timed out waiting for the moment to interrupt"
        time.sleep(0.01)


def _check_interrupted(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err + out, err
    assert err.strip().splitlines() == ["neuroprobe: interrupted"], err
    assert "wrote" not in out


needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").exists() or os.name != "posix",
                                reason="needs /proc/<pid>/maps and POSIX signals")


@needs_proc
def test_ctrl_c_at_start_up_exits_130_without_traceback(tmp_path):
    proc = _sigint_popen(["record", "--model", "organism", "--probe", "digits", "--out", "r.h5", "--quiet"], tmp_path)
    maps = Path(f"/proc/{proc.pid}/maps")

    def torch_is_loading() -> bool:  # the command body has started to import torch
        try:
            return "libtorch" in maps.read_text()
        except OSError:
            return False

    _wait_for(torch_is_loading, proc)
    proc.send_signal(signal.SIGINT)
    _check_interrupted(proc)


@needs_proc
def test_ctrl_c_during_a_recording_exits_130(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _sigint_popen(["record", "--model", "organism", "--probe", "digits", "--sites", "all", "--batch-size", "2",
                          "--out", str(out / "r.h5"), "--quiet"], tmp_path)
    _wait_for(lambda: any(out.iterdir()), proc)  # the recording (or its temporary file) exists
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _check_interrupted(proc)


def _typer_lower_bound() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r'"typer>=([0-9.]+)', text)
    assert m, "pyproject.toml must give typer a lower bound"
    return m.group(1)


@pytest.mark.slow
def test_usage_errors_with_the_lowest_allowed_typer(tmp_path):
    """pip-installs the lowest typer the range admits (beside the installed one) and reruns every case."""
    version = _typer_lower_bound()
    target = tmp_path / "typer-lowest"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                          f"typer=={version}"], capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        pytest.skip(f"cannot install typer=={version} (no package index?): {pip.stderr.strip()[-200:]}")
    probe = subprocess.run([sys.executable, "-c", "import typer; print(typer.__file__)"], env=_env(str(target)),
                           capture_output=True, text=True)
    assert str(target) in probe.stdout, probe
    for param in USAGE_ERRORS:
        args, fragment = param.values
        _check_usage_error(_run(args, tmp_path, extra_path=str(target)), args, fragment)
