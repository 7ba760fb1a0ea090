"""What an installed guillotina_amqp holds: the fixtures and mocks applications import."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of the sources (the build leaves nothing in the work tree)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "guillotina_amqp", source / "guillotina_amqp", ignore=shutil.ignore_patterns("__pycache__")
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("guillotina_amqp-*.whl")
    return wheel


def test_the_installed_package_ships_its_test_fixtures_and_needs_python_311(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {"guillotina_amqp/tests/fixtures.py", "guillotina_amqp/tests/mocks.py"} <= names
    assert not any(name.startswith(("tests/", "bench/")) for name in names)
    assert "Requires-Python: >=3.11" in metadata

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    # run from elsewhere, so neither the work tree nor its tests/ package can be imported
    probe = (
        "import guillotina_amqp, guillotina_amqp.tests.fixtures as f, guillotina_amqp.tests.mocks as m; "
        "print(guillotina_amqp.__file__); print(callable(f.amqp_worker), callable(f.amqp_channel), "
        "callable(m.connect))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert found.returncode == 0, found.stderr
    location, flags = found.stdout.splitlines()
    assert location.startswith(str(target))
    assert flags == "True True True"
