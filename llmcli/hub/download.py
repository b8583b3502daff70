"""`llm pull`: download a Hub repo into the standard Hugging Face cache, resumably and verified.

The cache layout is huggingface_hub's own (models--org--name/{blobs,snapshots/<commit>,refs/<rev>}),
so transformers, `huggingface_hub.scan_cache_dir()` and `llm` share one copy. We do the byte transfer
ourselves because huggingface_hub restarts interrupted files from byte 0 and only checks sizes:
here a partial blob (`blobs/<etag>.incomplete`) is continued with `Range: bytes=N-`, and every file
is hashed (sha256 for LFS files, git blob sha1 for the others) before it is renamed into blobs/.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import quote

import httpx2
from filelock import FileLock, Timeout
from huggingface_hub import constants, errors, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, validate_repo_id

from llmcli.errors import UserError
from llmcli.units import format_bytes

# What `llm pull` fetches by default: everything our engine reads, never pickled weights.
DEFAULT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "quantization_config.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CHUNK = 1 << 20
# Split GGUFs: model-Q4_K_M-00001-of-00003.gguf
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.I)


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    blob_id: str  # git object id (sha1 of "blob <size>\0" + bytes; for LFS files: of the pointer)
    sha256: str | None  # LFS files only

    @property
    def etag(self) -> str:
        """The blob's name in the cache, as huggingface_hub names it (X-Linked-Etag or ETag)."""
        return self.sha256 or self.blob_id


@dataclass
class PullPlan:
    repo_id: str
    revision: str
    commit: str
    files: list[RemoteFile]
    gguf: bool = False
    result: str = ""  # path inside the snapshot that `pull` returns ("" = the snapshot dir)


class Reporter(Protocol):
    def start(self, plan: PullPlan, todo: int) -> None: ...
    def file_start(self, f: RemoteFile, have: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def file_done(self, f: RemoteFile, skipped: bool) -> None: ...
    def note(self, msg: str) -> None: ...
    def close(self) -> None: ...


class QuietReporter:
    def start(self, plan, todo):
        pass

    def file_start(self, f, have):
        pass

    def advance(self, n):
        pass

    def file_done(self, f, skipped):
        pass

    def note(self, msg):
        pass

    def close(self):
        pass


# ---- spec and cache paths --------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'org/name:rest' -> ('org/name', 'rest'); rest is a revision or a GGUF quant tag."""
    repo, _, rest = spec.partition(":")
    repo = repo.strip().strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"{spec!r} is not a Hub repo id (expected ORG/NAME[:REVISION or GGUF tag])")
    return repo, (rest or None)


def cache_root() -> Path:
    return Path(constants.HF_HUB_CACHE)


def repo_folder(repo_id: str) -> Path:
    return cache_root() / ("models--" + repo_id.replace("/", "--"))


def cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a revision points to in the local cache (refs/<rev>), or the revision if it is a cached commit."""
    folder = repo_folder(repo_id)
    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision) and (folder / "snapshots" / revision).is_dir():
        return revision
    ref = folder / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        if (folder / "snapshots" / commit).is_dir():
            return commit
    return None


def free_bytes(path: Path) -> int:
    """Free space where the cache lives. LLMCLI_FREE_BYTES overrides it (tests simulate a full disk)."""
    if os.environ.get("LLMCLI_FREE_BYTES"):
        return int(os.environ["LLMCLI_FREE_BYTES"])
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


# ---- choosing files --------------------------------------------------------------------------------


def _matches(path: str, patterns) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in patterns)


def select_files(files: list[RemoteFile], include: list[str], exclude: list[str]) -> list[RemoteFile]:
    """Default set (or --include globs), minus --exclude, never pickles."""
    patterns = include or DEFAULT_PATTERNS
    out = [f for f in files if _matches(f.path, patterns) and not _matches(f.path, exclude)]
    return [f for f in out if not f.path.lower().endswith(PICKLE_SUFFIXES)]


def gguf_group(path: str) -> str:
    """Split parts of one GGUF share a group name."""
    return _SPLIT.sub(".gguf", path)


def match_gguf_tag(ggufs: list[RemoteFile], tag: str) -> list[RemoteFile]:
    """The .gguf files a tag like Q4_K_M names (case-insensitive); several only if they are parts of one split file."""
    t = tag.lower()
    hits = [f for f in ggufs if t in f.path.rsplit("/", 1)[-1].lower()]
    if len({gguf_group(f.path) for f in hits}) > 1:  # Q4_K matches Q4_K_M and Q4_K_S: prefer a delimited match
        delim = re.compile(r"(^|[^a-z0-9])" + re.escape(t) + r"([^a-z0-9]|$)")
        hits = [f for f in hits if delim.search(f.path.rsplit("/", 1)[-1].lower().removesuffix(".gguf"))]
    return sorted(hits, key=lambda f: f.path)


# ---- how hard to try -------------------------------------------------------------------------------

# Every request to the Hub uses these timeouts (huggingface_hub's shared session has none): 10 s to connect, as
# huggingface_hub's own HEAD calls wait, and 30 s without a byte before a read counts as stalled.
HUB_TIMEOUT = httpx2.Timeout(30.0, connect=10.0)
# A transient failure (a connection reset or cut, a body that ends early, a timeout, HTTP 408/429/5xx) is retried
# RETRIES times, waiting BACKOFF, 2*BACKOFF, 4*BACKOFF: 3 retries from 0.5 s wait 3.5 s in all. That covers a dropped
# Wi-Fi link, a proxy's reset or a server restart, and still reports an outage within seconds instead of waiting it
# out (huggingface_hub's own backoff, which made `llm estimate` take 24 s to fail, waits 1+2+4+8+8 s). During a
# download the count starts again after every attempt that received bytes, so a long file over a flaky link keeps
# progressing while the waits without progress stay bounded. LLMCLI_HUB_RETRIES and LLMCLI_HUB_BACKOFF (seconds)
# override both; the tests make the waits short. A refused connection or a connect timeout on a command's first
# request is not retried at all: nothing answers there (no network, a wrong HF_ENDPOINT), so we say so at once.
# 401/403/404 and checksum mismatches are answers, not accidents: never retried here (a mismatch deletes the bytes
# and fetches the file once more from byte 0, see _fetch_one).
RETRIES = 3
BACKOFF = 0.5

T = TypeVar("T")


def _retry_policy() -> tuple[int, float]:
    """(retries, first wait in seconds), from LLMCLI_HUB_RETRIES / LLMCLI_HUB_BACKOFF or the defaults above."""
    try:
        retries = int(os.environ.get("LLMCLI_HUB_RETRIES", RETRIES))
        backoff = float(os.environ.get("LLMCLI_HUB_BACKOFF", BACKOFF))
    except ValueError:
        raise UserError("LLMCLI_HUB_RETRIES must be a whole number, LLMCLI_HUB_BACKOFF a number of seconds") from None
    return max(retries, 0), max(backoff, 0.0)


class _Incomplete(Exception):
    """The server ended a response before the file's last byte."""


class _GaveUp(Exception):
    """A transfer's transient error, still there after the retries."""

    def __init__(self, error: Exception, retries: int) -> None:
        super().__init__(str(error))
        self.error, self.retries = error, retries


def _transient(e: BaseException, *, first_contact: bool = False) -> bool:
    """Whether trying again may help. first_contact: nothing from this command has reached the Hub yet."""
    if isinstance(e, HfHubHTTPError):  # checked first: it is an OSError too
        status = e.response.status_code if e.response is not None else 0
        return status in (408, 429) or status >= 500
    if isinstance(e, (httpx2.ConnectError, httpx2.ConnectTimeout)):
        return not first_contact
    return isinstance(e, (httpx2.TransportError, _Incomplete))


def _why(e: BaseException) -> str:
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code}"
    if isinstance(e, _Incomplete):
        return "connection closed early"
    return f"connection lost ({type(e).__name__})"


def _retrying(call: Callable[[], T], *, first_contact: bool = False) -> T:
    """call(), retried on transient errors as the policy above says. Ctrl-C is no Exception: it stops at once."""
    retries, delay = _retry_policy()
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as e:
            if attempt == retries or not _transient(e, first_contact=first_contact):
                raise
        time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")


# ---- talking to the Hub ----------------------------------------------------------------------------


def _endpoint() -> str:
    return constants.ENDPOINT


def _api_get(url: str, headers: dict, params: dict | None = None, *, first_contact: bool = False) -> httpx2.Response:
    """GET a Hub API url with our timeouts and retries; HTTP errors raised as huggingface_hub's typed errors."""

    def get() -> httpx2.Response:
        r = get_session().get(url, headers=headers, params=params, timeout=HUB_TIMEOUT)
        hf_raise_for_status(r)
        return r

    return _retrying(get, first_contact=first_contact)


def _hub_error(e: Exception, repo_id: str, revision: str | None) -> UserError:
    """One line for every way the Hub can say no."""
    if isinstance(e, errors.GatedRepoError):
        return UserError(
            f"{repo_id} is gated: accept its licence at {_endpoint()}/{repo_id} and set HF_TOKEN or pass --token"
        )
    if isinstance(e, errors.RevisionNotFoundError):
        return UserError(f"revision {revision!r} not found in {repo_id}")
    if isinstance(e, errors.RepositoryNotFoundError):
        return UserError(
            f"repository {repo_id} not found on {_endpoint()} (if it is private, set HF_TOKEN or pass --token)"
        )
    if isinstance(e, errors.RemoteEntryNotFoundError):
        return UserError(f"a file of {repo_id} disappeared from the Hub during the pull; run `llm pull` again")
    if isinstance(e, errors.OfflineModeIsEnabled):
        return UserError(f"HF_HUB_OFFLINE is set and {repo_id} is not in the cache ({cache_root()})")
    if isinstance(e, errors.HfHubHTTPError):
        return UserError(f"the Hub refused the request for {repo_id}: {str(e).splitlines()[0]}")
    if isinstance(e, (httpx2.TransportError, OSError)):
        cached = cached_commit(repo_id, revision)
        have = (
            f"a cached copy exists ({revision or 'main'} -> {cached[:12]}); `llm run {repo_id}` uses it"
            if cached
            else "no cached copy exists"
        )
        return UserError(f"cannot reach {_endpoint()} ({type(e).__name__}: {e}); {have}")
    raise e


def fetch_config(spec: str) -> Path:
    """config.json of a Hub repo (REPO or REPO:REVISION) alone, from the cache when the Hub cannot be reached
    (`llm estimate`). The HEAD that asks for it goes through our timeouts and retries first: hf_hub_download, when
    its own HEAD fails and the file is not cached, retries for 23 s before it gives up."""
    repo, _, rev = spec.partition(":")
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would break the one-line error contract
    try:
        if not constants.is_offline_mode():
            validate_repo_id(repo)
            url = hf_hub_url(repo, "config.json", revision=rev or None)
            try:
                _retrying(lambda: get_hf_file_metadata(url, timeout=HUB_TIMEOUT), first_contact=True)
            except Exception as e:
                if not _transient(e):
                    raise  # the Hub answered (no such repo, revision or file, gated): said below
                cached = try_to_load_from_cache(repo, "config.json", revision=rev or None)
                if isinstance(cached, str):
                    return Path(cached)
                trouble = (
                    f"{_endpoint()} kept failing ({_why(e)})"
                    if isinstance(e, HfHubHTTPError)
                    else f"cannot reach {_endpoint()} ({type(e).__name__}: {e})"
                )
                raise UserError(f"{trouble} and {spec}'s config.json is not in the local cache") from None
        return Path(hf_hub_download(repo, "config.json", revision=rev or None, etag_timeout=HUB_TIMEOUT.connect))
    except errors.GatedRepoError:
        raise UserError(f"{repo} is gated: accept its license on huggingface.co and log in (hf auth login)") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{repo!r} is neither a local path nor a Hub repository (or the repo is private)") from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{repo} has no revision {rev!r}") from None
    except errors.LocalEntryNotFoundError:  # before EntryNotFoundError: it is a subclass
        raise UserError(f"cannot reach the Hub and {spec}'s config.json is not in the local cache") from None
    except errors.EntryNotFoundError:
        raise UserError(f"{spec} has no config.json") from None
    except errors.HFValidationError as e:
        raise UserError(f"{spec!r} is not a valid Hub repo id: {e}") from None
    except OSError as e:  # network and HTTP errors
        raise UserError(f"could not fetch {spec}'s config.json: {str(e).splitlines()[0]}") from None
    finally:
        hub_log.setLevel(level)


def _listing(headers: dict, repo_id: str, rev: str, *, first_contact: bool = False) -> tuple[str, list[RemoteFile]]:
    """(commit, every file with its size and hashes) of a repo at a revision: the API calls HfApi.model_info and
    list_repo_tree make, with our timeouts and retries (HfApi's have no timeout, and its listing retries for 23 s)."""
    base = f"{_endpoint()}/api/models/{repo_id}"
    info = _api_get(f"{base}/revision/{quote(rev, safe='')}", headers, first_contact=first_contact).json()
    commit = info.get("sha") or rev
    files = []
    url: str | None = f"{base}/tree/{quote(commit, safe='')}"
    params: dict | None = {"recursive": "true", "expand": "false"}
    while url:
        r = _api_get(url, headers, params)
        for e in r.json():
            if e.get("type") == "file":
                lfs = e.get("lfs")
                files.append(RemoteFile(e["path"], e["size"], e["oid"], lfs["oid"] if lfs else None))
        url, params = r.links.get("next", {}).get("url"), None  # the next page's url carries the parameters
    return commit, files


def _tag_and_revision(
    headers: dict, repo_id: str, suffix: str | None, revision: str | None
) -> tuple[str | None, str, str, list[RemoteFile]]:
    """(GGUF tag or None, revision, commit, files) that REPO[:SUFFIX] with --revision means."""
    tag = None
    rev = revision
    try:
        if suffix and revision is None:
            # REPO:X is a GGUF tag if it names a .gguf at the default revision, else a revision.
            try:
                commit, files = _listing(headers, repo_id, "main", first_contact=True)
            except RevisionNotFoundError:  # no main branch: X can only be a revision
                commit, files = "", []
            ggufs = [f for f in files if f.path.lower().endswith(".gguf")]
            if ggufs and match_gguf_tag(ggufs, suffix):
                tag, rev = suffix, "main"
            else:
                rev = suffix
                commit, files = _listing(headers, repo_id, rev)
        else:
            tag = suffix
            rev = revision or "main"
            commit, files = _listing(headers, repo_id, rev, first_contact=True)
    except Exception as e:
        raise _hub_error(e, repo_id, rev) from None
    return tag, rev, commit, files


def _pick_gguf(
    repo_id: str,
    rev: str,
    files: list[RemoteFile],
    ggufs: list[RemoteFile],
    filename: str | None,
    tag: str | None,
    choose: Callable[[list[RemoteFile]], RemoteFile] | None,
) -> list[RemoteFile]:
    """The parts of the one GGUF model that --file, the tag or `choose` names."""
    if filename:
        chosen = [f for f in ggufs + files if f.path == filename or f.path.rsplit("/", 1)[-1] == filename][:1]
        if not chosen:
            raise UserError(f"{repo_id} has no file {filename!r} at {rev}")
        group = gguf_group(chosen[0].path)
        chosen = [f for f in ggufs if gguf_group(f.path) == group] or chosen
    elif tag:
        chosen = match_gguf_tag(ggufs, tag)
        if not chosen:
            raise UserError(f"{repo_id} has no GGUF file matching {tag!r}; it has: " + ", ".join(f.path for f in ggufs))
        if len({gguf_group(f.path) for f in chosen}) > 1:
            raise UserError(
                f"{tag!r} matches several GGUF files in {repo_id}: "
                + ", ".join(f.path for f in chosen)
                + "; use --file NAME"
            )
    else:
        if choose is None:
            listing_txt = "; ".join(f"{f.path} ({format_bytes(f.size)})" for f in ggufs)
            raise UserError(
                f"{repo_id} has {len(ggufs)} GGUF files, pick one with "
                f"`llm pull {repo_id}:TAG` (e.g. Q4_K_M) or --file NAME: {listing_txt}"
            )
        pick = choose(ggufs)
        chosen = [f for f in ggufs if gguf_group(f.path) == gguf_group(pick.path)]
    return sorted(chosen, key=lambda f: f.path)


def plan_pull(
    spec: str,
    *,
    revision: str | None = None,
    filename: str | None = None,
    include: list[str] = (),
    exclude: list[str] = (),
    token: str | None = None,
    choose: Callable[[list[RemoteFile]], RemoteFile] | None = None,
) -> PullPlan:
    """Ask the Hub which commit and files `llm pull spec` means."""
    repo_id, suffix = parse_spec(spec)
    tag, rev, commit, files = _tag_and_revision(build_hf_headers(token=token), repo_id, suffix, revision)
    ggufs = sorted((f for f in files if f.path.lower().endswith(".gguf")), key=lambda f: f.path)
    has_safetensors = any(f.path.endswith(".safetensors") for f in files)
    if filename or tag or (ggufs and not has_safetensors and not include):
        chosen = _pick_gguf(repo_id, rev, files, ggufs, filename, tag, choose)
        return PullPlan(repo_id, rev, commit, chosen, gguf=True, result=chosen[0].path)

    selected = select_files(files, list(include), list(exclude))
    if not any(f.path.endswith((".safetensors", ".gguf")) for f in selected) and not include:
        pickles = [f.path for f in files if f.path.lower().endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise UserError(
                f"{repo_id} only has pickled weights ({', '.join(pickles[:3])}); llm never loads "
                "pickles (they can run code). Look for a safetensors or GGUF version of this model"
            )
        raise UserError(f"{repo_id} has no safetensors or GGUF weights")
    if not selected:
        raise UserError(f"no file of {repo_id} matches the --include/--exclude patterns")
    return PullPlan(repo_id, rev, commit, selected)


# ---- the transfer ----------------------------------------------------------------------------------


def _hasher(f: RemoteFile):
    if f.sha256:
        return hashlib.sha256()
    h = hashlib.sha1()
    h.update(b"blob %d\0" % f.size)  # git's object header
    return h


class _Corrupt(Exception):
    pass


class _Partial:
    """An .incomplete blob, how many bytes it holds and their running hash (kept across retries)."""

    def __init__(self, f: RemoteFile, path: Path) -> None:
        self.f, self.path = f, path
        self.have, self.h, self.received = 0, _hasher(f), 0
        if path.exists() and path.stat().st_size > f.size:
            path.unlink()
        if path.exists():
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    self.h.update(chunk)
                    self.have += len(chunk)


def _transfer(session, url: str, headers: dict, p: _Partial, reporter: Reporter) -> None:
    """One GET that continues p to the file's size (Range: bytes=have-). Raises what the connection raised,
    _Incomplete if the response ended early, _Corrupt if the finished file's hash is wrong."""
    f = p.f
    if p.have < f.size:
        hdrs = dict(headers)
        if p.have:
            hdrs["Range"] = f"bytes={p.have}-"
        with session.stream("GET", url, headers=hdrs, timeout=HUB_TIMEOUT) as r:
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            if p.have and r.status_code != 206:  # the server ignored Range: start over
                p.have, p.h = 0, _hasher(f)
            with open(p.path, "ab" if p.have else "wb") as out:
                for chunk in r.iter_bytes():  # as received: a dropped connection keeps every byte so far
                    out.write(chunk)
                    p.h.update(chunk)
                    p.have += len(chunk)
                    p.received += len(chunk)
                    reporter.advance(len(chunk))
        if p.have < f.size:
            raise _Incomplete(f"{p.have} of {f.size} bytes")
    if p.have != f.size or p.h.hexdigest() != (f.sha256 or f.blob_id):
        raise _Corrupt(p.h.hexdigest())


def _link(blob: Path, pointer: Path) -> None:
    """snapshots/<commit>/<path> -> ../../blobs/<etag>, relative like huggingface_hub's (copy without symlinks)."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(pointer.name + f".{os.getpid()}.tmp")
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), tmp)
    except OSError:
        shutil.copyfile(blob, tmp)
    os.replace(tmp, pointer)


def _fetch_one(session, plan: PullPlan, f: RemoteFile, headers: dict, reporter: Reporter) -> bool:
    """Make sure blobs/<etag> holds f, verified. Returns False if it was already there."""
    folder = repo_folder(plan.repo_id)
    blob = folder / "blobs" / f.etag
    part = blob.with_name(blob.name + ".incomplete")
    lock_path = cache_root() / ".locks" / folder.name / f"{f.etag}.lock"  # the same lock huggingface_hub takes
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0.5)
    except Timeout:
        reporter.note(f"waiting for another download of {f.path} ...")
        lock.acquire()
    try:
        if blob.is_file() and blob.stat().st_size == f.size:
            return False
        url = hf_hub_url(plan.repo_id, f.path, revision=plan.commit)
        retries, backoff = _retry_policy()
        p = _Partial(f, part)
        reporter.file_start(f, p.have)
        left, delay, refetched = retries, backoff, False
        while True:
            received = p.received
            try:
                _transfer(session, url, headers, p, reporter)
                break
            except _Corrupt as e:
                part.unlink(missing_ok=True)  # a bad file is never kept; a resumed one may hold stale bytes
                if refetched:
                    want = f"sha256 {f.sha256}" if f.sha256 else f"git sha1 {f.blob_id}"
                    raise UserError(
                        f"{f.path} from {plan.repo_id} failed verification twice (expected {want}, "
                        f"got {e}); nothing was kept"
                    ) from None
                refetched = True  # once more, from byte 0
                reporter.note(f"{f.path}: checksum mismatch, downloading it again")
                p = _Partial(f, part)
                reporter.file_start(f, 0)
            except Exception as e:
                if not _transient(e):
                    raise
                if p.received > received:  # bytes arrived: the link works, count the retries again
                    left, delay = retries, backoff
                if left == 0:
                    raise _GaveUp(e, retries) from None
                left -= 1
                reporter.note(
                    f"{f.path}: {_why(e)} at {p.have} bytes; retrying in {delay:g} s ({retries - left}/{retries})"
                )
                time.sleep(delay)  # Ctrl-C here raises KeyboardInterrupt: no retry
                delay *= 2
        os.replace(part, blob)
        return True
    finally:
        lock.release()


def pull(plan: PullPlan, *, token: str | None = None, reporter: Reporter | None = None) -> Path:
    """Download what the plan lists that is not in the cache yet; return the local path."""
    reporter = reporter or QuietReporter()
    folder = repo_folder(plan.repo_id)
    snapshot = folder / "snapshots" / plan.commit

    def missing(f: RemoteFile) -> int:
        blob = folder / "blobs" / f.etag
        if blob.is_file():
            return 0
        part = blob.with_name(blob.name + ".incomplete")
        return f.size - min(part.stat().st_size, f.size) if part.exists() else f.size

    todo = sum(missing(f) for f in plan.files)
    free = free_bytes(folder)
    if todo > free:
        raise UserError(
            f"not enough disk space for {plan.repo_id}: {format_bytes(todo)} to download, "
            f"{format_bytes(free)} free in {cache_root()}"
        )
    headers = build_hf_headers(token=token)
    session = get_session()
    reporter.start(plan, todo)
    current = plan.files[0]
    try:
        for f in plan.files:
            current = f
            fetched = _fetch_one(session, plan, f, headers, reporter)  # checks for the blob under its lock
            _link(folder / "blobs" / f.etag, snapshot / f.path)
            reporter.file_done(f, skipped=not fetched)
    except KeyboardInterrupt:
        raise UserError(
            f"interrupted; run `llm pull {_resume_spec(plan)}` to resume from the bytes already downloaded",
            exit_code=130,
        ) from None
    except UserError:
        raise
    except Exception as e:
        raise _transfer_error(e, plan, current) from None
    finally:
        reporter.close()
    if plan.revision != plan.commit:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        ref = folder / "refs" / plan.revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(ref.name + f".{os.getpid()}.tmp")
        tmp.write_text(plan.commit)
        os.replace(tmp, ref)
    return snapshot / plan.result if plan.result else snapshot


def _transfer_error(e: Exception, plan: PullPlan, f: RemoteFile) -> UserError:
    """One line saying what failed during the transfer of f, and how to resume."""
    resume = f"run `llm pull {_resume_spec(plan)}` to resume from the bytes already downloaded"
    if isinstance(e, _GaveUp):
        tries = f"after {e.retries} retries" if e.retries else "(retries are off)"
        if isinstance(e.error, HfHubHTTPError):
            status = e.error.response.status_code if e.error.response is not None else "?"
            return UserError(f"the Hub kept failing while downloading {f.path} (HTTP {status}) {tries}; {resume}")
        return UserError(f"{_why(e.error)} while downloading {f.path} {tries}; {resume}")
    if isinstance(e, HfHubHTTPError):  # checked first: an HTTP error is an OSError too
        return _hub_error(e, plan.repo_id, plan.revision)
    if isinstance(e, httpx2.TransportError):
        return UserError(f"connection lost while downloading {f.path} ({type(e).__name__}); {resume}")
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return UserError(f"disk full while writing {f.path} ({e.strerror}); free some space and {resume}")
        return UserError(f"could not write {f.path} into {repo_folder(plan.repo_id)}: {e}; {resume}")
    return _hub_error(e, plan.repo_id, plan.revision)


def _resume_spec(plan: PullPlan) -> str:
    if plan.gguf:
        return f"{plan.repo_id} --file {plan.result}" + (
            f" --revision {plan.revision}" if plan.revision != "main" else ""
        )
    return plan.repo_id + (f":{plan.revision}" if plan.revision != "main" else "")
