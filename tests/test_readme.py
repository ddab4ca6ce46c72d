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
    script = tmp_path / "snippet.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=220,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
