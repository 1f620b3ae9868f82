"""Property-based fuzzing of the OpenAPI schema (schemathesis) against a real server: never a 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.artifacts import free_port, make_ensemble, start_server

SCHEMATHESIS = shutil.which("st") or str(Path(sys.executable).with_name("st"))


@pytest.mark.slow
def test_fuzzing_the_openapi_schema_finds_no_server_error(tmp_path):
    if not Path(SCHEMATHESIS).exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    port = free_port()
    server = start_server(["--ensemble", str(make_ensemble(tmp_path)), "--max-images", "4"], port)
    try:
        result = subprocess.run(
            [SCHEMATHESIS, "run", f"http://127.0.0.1:{port}/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "40", "--seed", "7", "--report-dir", str(tmp_path / "report")],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,  # its cache stays out of the repository
        )
        assert result.returncode == 0, result.stdout[-4000:]
        assert "passed" in result.stdout
        # The server is still alive and serving afterwards.
        import httpx

        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        server.terminate()
        server.wait(10)
