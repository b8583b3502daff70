"""`llm serve` under its limits and signals: a full queue answers 503 (and the server goes on), SIGTERM with a
stream in flight exits 0 within seconds. A server of its own: one running sequence, one waiting request."""

from __future__ import annotations

import signal
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_server import start_server

LONG = {
    "messages": [{"role": "user", "content": "Tell a story."}],
    "max_tokens": 300,
    "stream": True,
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def small(smollm2_gguf, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-small") / "server.log"
    served = start_server(smollm2_gguf, log, "--max-num-seqs", "1", "--max-queue", "1")
    served.name = httpx.get(served.url + "/v1/models").json()["data"][0]["id"]
    yield served
    served.stop()


def _first_token(client: httpx.Client, url: str, body: dict):
    """Open a stream and read up to its first token's chunk (after the role chunk): the request is then running.
    Returns the response and its line iterator (dropping the iterator would close the stream)."""
    r = client.send(client.build_request("POST", url, json=body), stream=True)
    lines = r.iter_lines()
    seen = 0
    while seen < 2:
        seen += next(lines).startswith("data: ")
    return r, lines


def _wait_idle(served, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = {
            s.name: s.value
            for f in text_string_to_metric_families(httpx.get(served.url + "/metrics").text)
            for s in f.samples
        }
        if m["llmcli_num_requests_running"] == 0 and m["llmcli_num_requests_waiting"] == 0:
            return
        time.sleep(0.1)
    pytest.fail("requests still running or waiting 20 s after their clients disconnected")


def test_a_full_queue_is_503_and_the_server_goes_on(small):
    url = small.url + "/v1/chat/completions"
    body = {"model": small.name, **LONG}
    with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b:
        running, _lines = _first_token(a, url, body)  # takes the one running slot
        waiting = b.send(b.build_request("POST", url, json=body), stream=True)  # headers: it is queued
        r = httpx.post(url, json={**body, "stream": False, "max_tokens": 2})
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "queue_full" and err["type"] == "server_error" and err["message"]
        running.close()
        waiting.close()
    _wait_idle(small)  # the disconnects reach the engine (both requests aborted, their slots free)
    r = httpx.post(url, json={"model": small.name, "messages": LONG["messages"], "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_sigterm_with_a_stream_in_flight_exits_0(small):
    with httpx.Client(timeout=60) as c:
        stream, _lines = _first_token(c, small.url + "/v1/chat/completions", {"model": small.name, **LONG})
        t0 = time.monotonic()
        small.proc.send_signal(signal.SIGTERM)
        try:
            code = small.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("llm serve did not exit within 20 s of SIGTERM")
        stream.close()
    assert code == 0 and time.monotonic() - t0 < 10
    assert "Traceback" not in small.text_log()
