"""scripts/setup_env.sh and its constraints: the environment the tests run in is the pinned one."""

from __future__ import annotations

import re
import subprocess
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "scripts" / "cpu_constraints.txt"


def _pins() -> dict:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, pinned = line.partition("==")
            assert sep and re.fullmatch(r"[A-Za-z0-9._-]+", name) and pinned, f"not a 'name==version' pin: {line!r}"
            pins[name] = pinned
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_every_requirement_but_torch():
    """Each package tip_verl asks for (its cpu/test extras included) is pinned, except torch (setup_env.sh pins
    the CPU build); the GPU extra is not installed on the CPU."""
    from packaging.requirements import Requirement

    requested = set()
    for text in requires("tip_verl"):
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("cpu", "test")):
            requested.add(_canonical(req.name))
    pinned = {_canonical(name) for name in _pins()}
    assert {"verl", "transformers", "pytest"} <= requested, requested
    assert requested - {"torch"} <= pinned, sorted(requested - {"torch"} - pinned)
    assert "torch" not in pinned


def test_installed_versions_are_the_pinned_ones():
    """The .venv that setup_env.sh built (CI's, a fresh machine's) has exactly the constrained versions."""
    wrong = {}
    for name, pinned in _pins().items():
        try:
            got = version(name)
        except PackageNotFoundError:
            got = None
        if got != pinned:
            wrong[name] = (pinned, got)
    assert not wrong, f"installed versions differ from scripts/cpu_constraints.txt (pinned, installed): {wrong}"


def test_arguments_are_refused_before_any_install():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup_env.sh"), "--with-assets"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "takes no arguments (got '--with-assets')" in proc.stderr and "creating" not in proc.stderr
