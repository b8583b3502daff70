"""A real HTTP server on 127.0.0.1 speaking the parts of the Hugging Face Hub protocol downloads use.

  GET  /api/models/{repo}/revision/{rev}       model info (sha, siblings, gated)
  GET  /api/models/{repo}/tree/{rev}[/{path}]  file listing with git oids and lfs {oid: sha256, size}
  HEAD /{repo}/resolve/{rev}/{path}            ETag, X-Repo-Commit, X-Linked-Etag, X-Linked-Size
  GET  /{repo}/resolve/{rev}/{path}            the bytes, honouring `Range: bytes=N-`

Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, GatedRepo, EntryNotFound) as the Hub does.
Knobs make it misbehave on purpose: cut a connection mid-file (at a byte offset, or after N bytes of every GET),
answer with an error status, corrupt bytes, throttle, require a token.
Every request is logged (method, path, Range header) so tests can assert what the client asked for.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n"
    ).encode()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]  # commit sha -> {path: bytes}
    refs: dict[str, str]  # branch/tag -> commit sha
    gated: bool = False

    def commit_for(self, rev: str) -> str | None:
        if rev in self.commits:
            return rev
        return self.refs.get(rev)


def make_repo(files: dict[str, bytes], gated: bool = False, seed: str = "") -> Repo:
    commit = hashlib.sha1(
        (seed + "".join(sorted(files))).encode() + b"".join(files[k] for k in sorted(files))
    ).hexdigest()
    return Repo({commit: dict(files)}, {"main": commit}, gated)


def add_revision(repo: Repo, name: str, files: dict[str, bytes]) -> str:
    commit = hashlib.sha1(name.encode() + b"".join(files[k] for k in sorted(files))).hexdigest()
    repo.commits[commit] = dict(files)
    repo.refs[name] = commit
    return commit


def files_from_dir(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@dataclass
class Knobs:
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> file offset at which the connection drops
    cut_every: dict[str, int] = field(default_factory=dict)  # path -> bytes each GET sends (from its Range) first
    cut_times: int = 1  # how many GETs get cut (by cut_after or cut_every)
    fail_status: int = 0  # answer requests whose path contains fail_match with this status (0: never)
    fail_match: str = "/resolve/"
    fail_times: int = 1 << 30  # how many requests get it
    page_size: int = 0  # tree listings in pages of this many entries, linked by `Link: <url>; rel="next"` (0: one)
    corrupt: dict[str, int] = field(default_factory=dict)  # path -> how many GETs serve flipped bytes
    throttle: float = 0.0  # seconds slept per 64 KiB chunk
    tokens: set[str] = field(default_factory=lambda: {"hf_good"})  # tokens that may read gated repos


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.knobs = Knobs()
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                server._handle(self, head=True)

            def do_GET(self):
                server._handle(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def ranges(self, path_suffix: str) -> list[str | None]:
        """Range headers of the GETs of file path_suffix ("" = every file)."""
        return [
            r
            for m, p, r in self.log
            if m == "GET" and "/resolve/" in p and (p.endswith("/" + path_suffix) or not path_suffix)
        ]

    # ---- protocol ------------------------------------------------------------------------------

    def _send(self, h, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, head: bool, msg: str = "") -> None:
        body = json.dumps({"error": msg or code}).encode()
        self._send(
            h,
            status,
            body,
            {"X-Error-Code": code, "X-Error-Message": msg or code, "Content-Type": "application/json"}
            if code
            else {"Content-Type": "application/json"},
            head,
        )

    def _json(self, h, obj, head: bool) -> None:
        self._send(h, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

    def _handle(self, h, head: bool) -> None:
        url = urlparse(h.path)
        path = unquote(url.path)
        with self._lock:
            self.log.append((h.command, path, h.headers.get("Range")))
            fail = self.knobs.fail_status and self.knobs.fail_match in path and self.knobs.fail_times > 0
            if fail:
                self.knobs.fail_times -= 1
        if fail:
            code = {401: "RepoNotFound", 403: "GatedRepo", 404: "EntryNotFound"}.get(self.knobs.fail_status, "")
            return self._error(h, self.knobs.fail_status, code, head, f"injected {self.knobs.fail_status}")
        try:
            if path.startswith("/api/models/"):
                self._api(h, path[len("/api/models/") :], head)
            else:
                self._resolve(h, path.lstrip("/"), head)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _api(self, h, rest: str, head: bool) -> None:
        parts = rest.split("/")
        repo_id, kind, rev, sub = (
            "/".join(parts[:2]),
            (parts[2] if len(parts) > 2 else ""),
            (parts[3] if len(parts) > 3 else "main"),
            "/".join(parts[4:]),
        )
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 401, "RepoNotFound", head, "Repository not found")
        commit = repo.commit_for(rev)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", head, f"Invalid rev id: {rev}")
        files = repo.commits[commit]
        if kind == "revision":
            return self._json(
                h,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit,
                    "private": False,
                    "gated": "auto" if repo.gated else False,
                    "disabled": False,
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                    "tags": [],
                },
                head,
            )
        if kind == "tree":
            out, dirs = [], set()
            for p in sorted(files):
                if sub and not p.startswith(sub.rstrip("/") + "/"):
                    continue
                for i in range(1, p.count("/") + 1):
                    dirs.add("/".join(p.split("/")[:i]))
                data = files[p]
                entry = {"type": "file", "path": p, "size": len(data)}
                if p.endswith(LFS_SUFFIXES):
                    entry["oid"] = git_blob_sha1(lfs_pointer(data))
                    entry["lfs"] = {
                        "oid": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "pointerSize": len(lfs_pointer(data)),
                    }
                else:
                    entry["oid"] = git_blob_sha1(data)
                out.append(entry)
            out += [
                {"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
                for d in sorted(dirs)
            ]
            n = self.knobs.page_size
            if n:  # the Hub's cursor pagination; the next url carries the query
                query = dict(p.split("=", 1) for p in urlparse(h.path).query.split("&") if "=" in p)
                at = int(query.pop("cursor", 0))
                page, rest = out[at : at + n], out[at + n :]
                if rest:
                    q = "&".join(f"{k}={v}" for k, v in {**query, "cursor": str(at + n)}.items())
                    link = f'<{self.url}{urlparse(h.path).path}?{q}>; rel="next"'
                    return self._send(h, 200, json.dumps(page).encode(), {"Link": link}, head)
                out = page
            return self._json(h, out, head)
        return self._error(h, 404, "EntryNotFound", head)

    def _resolve(self, h, rest: str, head: bool) -> None:
        parts = rest.split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 404, "RepoNotFound", head)
        repo_id, rev, fpath = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 401, "RepoNotFound", head, "Repository not found")
        if repo.gated:
            auth = h.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ").strip()
            if token not in self.knobs.tokens:
                return self._error(
                    h,
                    403 if token else 401,
                    "GatedRepo",
                    head,
                    "Access to model is restricted. You must have access to it and be authenticated",
                )
        commit = repo.commit_for(rev)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", head, f"Invalid rev id: {rev}")
        data = repo.commits[commit].get(fpath)
        if data is None:
            return self._error(h, 404, "EntryNotFound", head, f"{fpath} does not exist")
        lfs = fpath.endswith(LFS_SUFFIXES)
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if lfs:
            sha = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{git_blob_sha1(data)}"'
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                return self._send(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if head:
            return self._send(h, status, body, headers, head=True)
        with self._lock:
            corrupt = self.knobs.corrupt.get(fpath, 0) > 0
            if corrupt:
                self.knobs.corrupt[fpath] -= 1
            cut = self.knobs.cut_after.get(fpath) if self.knobs.cut_times > 0 else None
            if fpath in self.knobs.cut_every and self.knobs.cut_times > 0:
                cut = start + self.knobs.cut_every[fpath]
            if cut is not None:
                self.knobs.cut_times -= 1
        if corrupt:
            body = bytes(b ^ 0xFF for b in body[:16]) + body[16:]
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        limit = len(body) if cut is None else max(0, cut - start)
        sent = 0
        while sent < limit:
            chunk = body[sent : min(limit, sent + 65536)]
            h.wfile.write(chunk)
            h.wfile.flush()
            sent += len(chunk)
            if self.knobs.throttle:
                time.sleep(self.knobs.throttle)
        if cut is not None:  # drop the connection mid-body
            h.close_connection = True
            h.wfile.flush()
            import socket

            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ---- running the CLI against the server ---------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def cli_env(hub_url: str, tmp: Path) -> dict[str, str]:
    """A subprocess environment with its own HF cache and llmcli home, talking only to hub_url."""
    import os

    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "LLMCLI_"))}
    e.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(tmp / "hf"),
        LLMCLI_HOME=str(tmp / "llmcli"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        PYTHONPATH=str(ROOT),
    )
    return e


def run_llm(env: dict, *args: str, timeout: float = 60, input: str | None = None):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "llmcli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
