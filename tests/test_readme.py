"""Every Python block of the README runs as written, each as a complete program in a fresh directory."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def readme_blocks() -> list[tuple[int, str]]:
    text = (ROOT / "README.md").read_text()
    return [(text.count("\n", 0, match.start()) + 1, match.group(1)) for match in _BLOCK.finditer(text)]


def _param(line: int, code: str) -> object:
    marks = []
    if 'service_backend="ray"' in code:
        marks = [pytest.mark.ray, pytest.mark.slow]
    return pytest.param(code, id=f"README.md:{line}", marks=marks)


def test_the_readme_has_python_blocks_to_run() -> None:
    assert len(readme_blocks()) >= 5


@pytest.mark.timeout(240)
@pytest.mark.parametrize("code", [_param(line, code) for line, code in readme_blocks()])
def test_a_readme_block_runs_as_written(code: str, tmp_path: Path) -> None:
    if 'service_backend="ray"' in code and importlib.util.find_spec("ray") is None:
        if os.environ.get("ACTORFLOW_REQUIRE_RAY"):
            pytest.fail("Ray is required here (ACTORFLOW_REQUIRE_RAY) but not installed")
        pytest.skip("Ray is not installed: pip install '.[ray]'")
    run_as_a_program(code, tmp_path, timeout=220)


def run_as_a_program(code: str, folder: Path, *, timeout: float, flags: tuple[str, ...] = ()) -> None:
    """Run `code` as a script of its own in `folder`, importing this checkout's actorflow; fail with its output."""
    script = folder / "snippet.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, *flags, str(script)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def front_door_example() -> str:
    """The first example of `actorflow`'s docstring: the indented block after its first ``::``."""
    import actorflow  # noqa: PLC0415 - the package under test, imported where it is read

    doc = actorflow.__doc__ or ""
    block = doc.split("::\n\n", 1)[1].split("\n\n\n", 1)[0]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line.removeprefix("    "))
    return "\n".join(lines).strip() + "\n"


def test_the_front_doors_first_example_runs_a_pipeline_of_ones_own_on_a_payload_of_ones_own(tmp_path: Path) -> None:
    code = front_door_example()
    assert "Pipeline(" in code
    assert 'submit({"x": 21})' in code
    run_as_a_program(code, tmp_path, timeout=60, flags=("-W", "error"))  # not even a warning
