"""The environment is the lock (issue 25): what runs the tests is exactly locks/cpu.txt, and the locks hold what
pyproject.toml pins (a dependency changed without `make lock` fails here)."""
import re
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NEVER_BESIDE_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec")


def lock_pins(name: str) -> dict[str, str]:
    text = (ROOT / "locks" / name).read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M))
    assert pins, f"locks/{name} pins nothing"
    for package in pins:  # every pin carries its hashes
        block = text.split(f"\n{package}==", 1)[1].split("\n", 2)
        assert "--hash=sha256:" in block[1], f"locks/{name}: {package} has no hash"
    return {canonicalize_name(k): v for k, v in pins.items()}


def test_the_installed_environment_is_the_cpu_lock():
    pins = lock_pins("cpu.txt")
    # the environment's own site-packages: not the copies vendored inside setuptools, which it puts on sys.path
    site = sysconfig.get_paths()["purelib"]
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=[site])}
    wrong = {name: (version, installed.get(name)) for name, version in pins.items() if installed.get(name) != version}
    assert not wrong, f"installed ≠ locks/cpu.txt (locked, installed): {wrong}"
    tools = lock_pins("tools.txt")  # uv, installed by hash before the sync (it makes and installs the locks)
    assert all(installed.get(name) == version for name, version in tools.items())
    extra = set(installed) - set(pins) - set(tools) - {"rlaif-ray", "pip"}  # pip: the venv's own
    assert not extra, f"installed but not in locks/cpu.txt: {sorted(extra)}"
    for name in NEVER_BESIDE_CPU_TORCH:
        assert name not in installed and name not in pins


@pytest.mark.parametrize("lock, extras", [("cpu.txt", ("cpu", "dev", "smol")), ("gpu.txt", ("gpu",))])
def test_the_locks_hold_what_pyproject_asks_for(lock, extras):
    pins = lock_pins(lock)
    wanted = PYPROJECT["project"]["dependencies"] + [
        r for extra in extras for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    for line in wanted:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"locks/{lock} lacks {req.name}: run `make lock`"
        version = pins[name].split("+")[0]  # torch 2.13.0+cpu satisfies ==2.13.0
        assert req.specifier.contains(version, prereleases=True), \
            f"locks/{lock} has {req.name}=={pins[name]}, pyproject asks {req.specifier}: run `make lock`"
