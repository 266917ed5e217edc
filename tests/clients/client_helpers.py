"""Constants and assertions shared by the client tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import subprocess

ADMIN_KEY = "clients-admin-key"
INFERENCE_KEY = "clients-inference-key"


def assert_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The command failed with `code` and said why in exactly one `error: ...` line on stderr."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
