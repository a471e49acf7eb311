"""Every curl command in README.md, run with the real curl against a real server (the "curl" row of the table)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.server.conftest import ServerProcess
from tests.support import REPO


def readme_curl_commands() -> list[str]:
    """curl commands (with their backslash continuations) from README's bash blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            if lines[i].startswith("curl "):
                command = lines[i]
                while command.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    command = command[:-1] + " " + lines[i].strip()
                commands.append(command)
            i += 1
    return commands


def test_readme_has_the_documented_requests() -> None:
    paths = " ".join(readme_curl_commands())
    for path in ("/v1/generate", "/v1/perplexity", "/v1/chat/completions", "/tokenize", "/v1/perplexity/text"):
        assert path in paths


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_curl_commands())
def test_readme_curl_command(server: ServerProcess, command: str) -> None:
    assert shutil.which("curl"), "curl is not installed"
    host = server.url.removeprefix("http://")
    command = command.replace("127.0.0.1:8000", host).replace("curl -s", "curl -sS --fail-with-body", 1)
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    body = json.loads(proc.stdout)
    assert "error" not in body
