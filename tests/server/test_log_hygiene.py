"""Default logs and error bodies carry no API key, prompt, generated text or stack trace."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.server.conftest import ServerProcess

KEY = "log-hygiene-key-93b1d0"
MARKER = "PROMPT-SECRET-4e1c"


def test_no_key_prompt_text_or_traceback_in_logs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server = ServerProcess(tiny_checkpoint, log, env={"CHIAR_API_KEY": KEY, "CHIAR_LOG_LEVEL": "info"}).start()
    auth = {"Authorization": f"Bearer {KEY}"}
    texts: list[str] = []
    try:
        with httpx.Client(base_url=server.url, headers=auth, timeout=60) as client:
            ok = client.post("/v1/generate", json={"prompt": f"{MARKER} the", "max_new_tokens": 4, "temperature": 0})
            assert ok.status_code == 200
            texts.append(ok.json()["text"])
            done = client.post("/v1/completions", json={"prompt": f"{MARKER} a", "max_tokens": 4, "temperature": 0})
            assert done.status_code == 200
            texts.append(done.json()["choices"][0]["text"])
            assert client.post("/v1/perplexity", json={"text": f"{MARKER} the cat"}).status_code == 200
            bad = [
                client.post("/v1/generate", json={"prompt": f"{MARKER} " + "word " * 400, "max_new_tokens": 1}),
                client.post("/v1/generate", json={"prompt": f"{MARKER}", "temperature": "hot"}),
                client.post("/v1/generate", content=f'{{"prompt": "{MARKER}'.encode()),
                client.post("/v1/tokenize", json={"text": f"{MARKER}", "add_bos": 0}),
            ]
            assert all(r.status_code == 400 for r in bad)
            for r in bad:  # error bodies name the field, never echo the prompt back
                assert MARKER not in r.text and "Traceback" not in r.text, r.text
            wrong = httpx.post(server.url + "/v1/generate", json={"prompt": MARKER},
                               headers={"Authorization": "Bearer not-the-key"}, timeout=30)
            assert wrong.status_code == 401 and KEY not in wrong.text
    finally:
        server.stop()
    text = log.read_text(errors="replace")
    assert "serving" in text  # the log is really the server's
    assert KEY not in text
    assert MARKER not in text
    assert "Traceback" not in text
    for generated in texts:
        if len(generated.strip()) >= 8:
            assert generated not in text
