"""A real `llm serve` subprocess on a free 127.0.0.1 port, always stopped (SIGTERM, then SIGKILL).

tests/serve start it from here: a conftest.py there would shadow tests/conftest.py (both import as `conftest`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

API_KEY = "test-key"


def descendants(pid: int) -> list[int]:
    """Every live process below pid (children, their children...), from /proc's parent links."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def gone(pids: list[int], timeout: float = 0.0) -> bool:
    """Whether every pid has exited (a zombie counts: it waits only for its new parent to reap it), waiting up to
    timeout seconds for it."""

    def exited(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError):
            return True

    deadline = time.monotonic() + timeout
    while not all(exited(p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    log: Path
    health: list[int] = field(default_factory=list)  # the /health statuses seen while waiting for it

    def text_log(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(model: Path, log: Path, *flags: str, timeout: float = 240) -> Served:
    port = free_port()
    cmd = [sys.executable, "-m", "llmcli", "serve", str(model), "--port", str(port), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLM_API_KEY": ""}
    out = log.open("w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    served = Served(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llm serve exited with {proc.returncode}:\n{served.text_log()[-3000:]}")
        try:
            status = httpx.get(served.url + "/health", timeout=5).status_code
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        served.health.append(status)
        if status == 200:
            return served
        time.sleep(0.1)
    served.stop()
    raise RuntimeError(f"llm serve did not become healthy:\n{served.text_log()[-3000:]}")
