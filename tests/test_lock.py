"""requirements/lock.txt (the exact environment CI installs, ``make install-locked``) agrees with pyproject.toml.

A dependency added to or narrowed in pyproject.toml without ``make lock`` fails here, naming the requirement, so CI
never tests a lock that the ranges no longer describe. The lock targets Python 3.11 (the book's), all platforms.
"""

from __future__ import annotations

import re

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LOCKED_EXTRAS = ("book", "test")  # what `make lock` resolves and `make install-locked` installs

#: the marker environment the lock is judged in: Linux x86_64, CPython 3.11 (CI and the Pages workflow)
ENV = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.7",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}


def parse_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """``name -> (version, hashes)`` of the pins that apply in :data:`ENV` (``name==version ; marker \\``)."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line)
        if m:
            name, version, marker = m.groups()
            current = None
            if marker is None or Requirement(f"x ; {marker}").marker.evaluate(ENV):
                current = canonicalize_name(name)
                pins[current] = (version, [])
        elif current and (h := re.match(r"^\s+--hash=(sha256:[0-9a-f]{64})", line)):
            pins[current][1].append(h.group(1))
    return pins


@pytest.fixture(scope="module")
def lock(repo_root):
    return parse_lock((repo_root / "requirements" / "lock.txt").read_text())


def test_lock_satisfies_every_requirement_of_pyproject(repo_root, lock):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in LOCKED_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    problems = []
    for spec in reqs:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate(ENV):
            continue
        pin = lock.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{spec!r} is not in the lock")
        elif not req.specifier.contains(pin[0], prereleases=True):
            problems.append(f"{spec!r} but the lock pins {req.name}=={pin[0]}")
    assert not problems, "requirements/lock.txt is stale, run `make lock`:\n  " + "\n  ".join(problems)


def test_every_pin_is_exact_and_hashed(lock):
    assert {"torch", "open-clip-torch", "timm", "numpy", "jupyter-book", "playwright"} <= set(lock)
    unhashed = [name for name, (_, hashes) in lock.items() if not hashes]
    assert not unhashed, f"pins without --hash in requirements/lock.txt: {unhashed}"


def test_parse_lock_reads_markers_and_hashes():
    text = "\n".join([
        "numpy==2.4.6 ; python_full_version < '3.12' \\",
        "    --hash=sha256:" + "a" * 64 + " \\",
        "    --hash=sha256:" + "b" * 64,
        "    # via ovlib",
        "numpy==2.5.5 ; python_full_version >= '3.12' \\",
        "    --hash=sha256:" + "c" * 64,
        "pywinpty==3.1.2 ; os_name == 'nt' \\",
        "    --hash=sha256:" + "d" * 64,
        "Jupyter_Book==1.0.4 \\",
        "    --hash=sha256:" + "e" * 64,
    ])
    pins = parse_lock(text)
    assert pins == {"numpy": ("2.4.6", ["sha256:" + "a" * 64, "sha256:" + "b" * 64]),
                    "jupyter-book": ("1.0.4", ["sha256:" + "e" * 64])}
