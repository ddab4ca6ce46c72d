"""actorflow as a host installs it: one import package, a front door, and a command, beside the host's own packages.

These build the real wheel and sdist with pip and hatchling, and install the wheel
into a fresh virtual environment; the first run downloads the build backend and the
dependencies from the package index, later runs take them from pip's cache.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import actorflow

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def run(*cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(part) for part in cmd], cwd=cwd, capture_output=True, text=True, timeout=500, env=env, check=False
    )
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", out, ROOT)
    return out


def wheel_of(dist: Path) -> Path:
    (wheel,) = dist.glob("actorflow-*.whl")
    return wheel


def test_the_wheel_holds_only_the_actorflow_package_and_its_dist_info(dist: Path) -> None:
    names = zipfile.ZipFile(wheel_of(dist)).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"actorflow", f"actorflow-{actorflow.__version__}.dist-info"}
    for expected in ("actorflow/__init__.py", "actorflow/py.typed", "actorflow/cli/__init__.py"):
        assert expected in names
    for layer in ("actors", "core", "services", "api"):
        assert f"actorflow/{layer}/__init__.py" in names
    assert "actorflow/api/static/dashboard.html" in names
    assert not [name for name in names if "__pycache__" in name or name.startswith("actorflow/tests")]
    entry_points = zipfile.ZipFile(wheel_of(dist)).read(f"actorflow-{actorflow.__version__}.dist-info/entry_points.txt")
    assert b"actorflow = actorflow.cli:main" in entry_points


def test_the_sdist_builds_a_wheel_that_installs_and_its_tests_collect(dist: Path, tmp_path: Path) -> None:
    (sdist,) = dist.glob("actorflow-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    (unpacked,) = tmp_path.glob("actorflow-*")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", tmp_path / "w", unpacked)
    (rebuilt,) = (tmp_path / "w").glob("*.whl")
    assert sorted(zipfile.ZipFile(rebuilt).namelist()) == sorted(zipfile.ZipFile(wheel_of(dist)).namelist())
    # The sdist's tests import `actorflow` from the sdist's own folder, as they would from a checkout.
    collected = run(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", cwd=unpacked)
    assert "tests collected" in collected or " collected" in collected, collected


APP_FILES = {
    # The host app's own packages, named like actorflow's layers: they must keep winning.
    "core/__init__.py": "WHO = 'the app core'\n",
    "api/__init__.py": "WHO = 'the app api'\n",
    "services/__init__.py": "WHO = 'the app services'\n",
    "actors/__init__.py": "WHO = 'the app actors'\n",
    "app.py": textwrap.dedent(
        """
        import sys

        import actors
        import api
        import core
        import services
        from actorflow import Runtime, RuntimeConfig, TaskState

        assert core.WHO == "the app core", core.__file__
        assert (api.WHO, services.WHO, actors.WHO) == ("the app api", "the app services", "the app actors")
        with Runtime(RuntimeConfig(journal_path=sys.argv[1])) as runtime:
            record = runtime.submit({"name": "hello", "data": 1}, task_id="t-1").result(timeout=30)
        assert record.state is TaskState.COMPLETED, record
        print("ran", record.task_id, record.state.value)
        """
    ),
}


def test_a_host_app_with_its_own_core_api_services_and_actors_runs_a_task_from_the_installed_wheel(
    dist: Path, tmp_path: Path
) -> None:
    app = tmp_path / "app"
    for name, text in APP_FILES.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", f"{wheel_of(dist)}[http]")

    journal = tmp_path / "tasks.db"
    clean_env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    assert run(python, "app.py", journal, cwd=app, env=clean_env).strip() == "ran t-1 COMPLETED"

    command = env_dir / "bin" / "actorflow"
    listing = run(command, "--help", cwd=app, env=clean_env)
    for name in ("demo", "serve", "trace", "inspect"):
        assert f"  {name} " in listing
    assert run(command, "--version", cwd=app, env=clean_env).strip() == f"actorflow {actorflow.__version__}"
    inspected = run(command, "inspect", journal, "--task", "t-1", cwd=app, env=clean_env)
    assert "task t-1  COMPLETED" in inspected
    assert (
        run(python, "-m", "actorflow", "inspect", journal, "--limit", "0", cwd=app, env=clean_env).count("COMPLETED")
        == 1
    )
    # The dashboard page is read from the installed package.
    page = run(
        python,
        "-c",
        "import urllib.request\n"
        "from actorflow import Runtime\n"
        "from actorflow.api import create_app, serve_in_background\n"
        "with Runtime() as rt, serve_in_background(create_app(rt)) as server:\n"
        "    print(urllib.request.urlopen(f'http://127.0.0.1:{server.port}/', timeout=10).read()[:15].decode())",
        cwd=app,
        env=clean_env,
    )
    assert page.strip().lower().startswith("<!doctype html>"), page
    # The installed package is the wheel's: nothing of this checkout is on the path.
    where = run(python, "-c", "import actorflow, sys; print(actorflow.__file__)", cwd=app, env=clean_env)
    assert str(env_dir) in where
    assert str(ROOT) not in where


def test_an_editable_install_exposes_actorflow_and_nothing_else_of_the_checkout(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "-e", ROOT)  # with its dependencies: `editables` among them
    probe = textwrap.dedent(
        """
        import importlib.util
        print(importlib.util.find_spec("actorflow").origin)
        for name in ("core", "actors", "services", "api", "tests", "benchmarks"):
            print(name, importlib.util.find_spec(name))
        """
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    lines = run(python, "-c", probe, cwd=outside, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}).splitlines()
    assert lines[0] == str(ROOT / "actorflow" / "__init__.py")
    assert lines[1:] == [f"{name} None" for name in ("core", "actors", "services", "api", "tests", "benchmarks")]


def test_every_module_of_the_package_is_a_regular_file_and_no_folder_inside_it_is_a_link() -> None:
    package = ROOT / "actorflow"
    links = [path for path in package.rglob("*") if path.is_symlink()]
    assert links == []
    modules = sorted(path.relative_to(package) for path in package.rglob("*.py"))
    assert len(modules) == len({path.resolve() for path in package.rglob("*.py")})
    assert Path("core/journal.py") in modules or Path("core/journal/__init__.py") in modules
