"""guidellm (installed as its docs say, into its own venv by `make setup-guidellm`) runs the README's command in
both request formats against a real server: every request succeeds, and its token counts are the server's."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.guidellm import parse_report, run_guidellm
from tests.server.conftest import ServerProcess
from tests.support import REPO, metric, scrape

GUIDELLM = Path(os.environ.get("GUIDELLM", REPO / ".venv-guidellm" / "bin" / "guidellm"))


def readme_guidellm_command() -> str:
    """README's `guidellm run` command, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if "guidellm run" in b]
    return re.sub(r"\\\n\s*", "", block).strip()


@pytest.fixture(scope="module")
def guidellm_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("logs") / "guidellm.log").start()
    yield proc
    proc.stop()


def run_readme_command(server: ServerProcess, checkpoint: Path, request_format: str, work: Path) -> dict:
    """The README command as a user runs it, against the test server and checkpoint, with a JSON report."""
    command = readme_guidellm_command()
    for old, new in (("http://127.0.0.1:8000", server.url), ("checkpoints/chiar-small", str(checkpoint)),
                     ("request_format=/v1/completions", f"request_format={request_format}")):
        assert old in command, f"README's guidellm command no longer has {old!r}"
        command = command.replace(old, new)
    argv = shlex.split(command)
    assert argv[0] == "guidellm"
    argv[0] = str(GUIDELLM)
    run_guidellm([*argv, "--output", f"kind=json,path={work / 'report.json'}", "--disable-console-interactive"], work, timeout=600)
    return {"report": parse_report(work / "report.json"), "command": command}


@pytest.mark.slow
@pytest.mark.parametrize("request_format", ["/v1/completions", "/v1/chat/completions"])
def test_guidellm_readme_command(guidellm_server: ServerProcess, tiny_checkpoint: Path, tmp_path: Path,
                                 request_format: str) -> None:
    assert GUIDELLM.is_file(), f"{GUIDELLM} not found: `make setup-guidellm` installs it (make test does)"
    before = metric(scrape(guidellm_server.url), "chiar_generation_tokens_total")
    run = run_readme_command(guidellm_server, tiny_checkpoint, request_format, tmp_path)
    report, command = run["report"], run["command"]
    requests = int(re.search(r"max_requests,count=(\d+)", command).group(1))
    prompt_tokens = int(re.search(r"prompt_tokens=(\d+)", command).group(1))
    output_tokens = int(re.search(r"output_tokens=(\d+)", command).group(1))
    assert (report.successful, report.errored, report.incomplete) == (requests, 0, 0)
    assert report.ttft_ms > 0 and report.itl_ms > 0 and report.output_tokens_per_s > 0
    if request_format == "/v1/completions":
        # its prompts are counted with the checkpoint's AutoTokenizer (BOS included), as the server counts them
        assert report.prompt_tokens == prompt_tokens
        assert report.output_tokens == output_tokens  # ignore_eos honoured
    else:  # the chat template's turn text comes on top; generation may stop at the template's "\nUser:"
        assert report.prompt_tokens > prompt_tokens and 1 <= report.output_tokens <= output_tokens
    # guidellm's output counts (from the streamed usage) are the tokens the server generated for it
    generated = metric(scrape(guidellm_server.url), "chiar_generation_tokens_total") - before
    assert generated == pytest.approx(report.output_tokens * requests)
