"""`llm rm`'s plan: what deleting a local model frees (plan_removal), and the deletion itself (Removal)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from llmcli.errors import NotDownloaded, UserError
from llmcli.formats import is_gguf
from llmcli.hub import default_model
from llmcli.hub.download import cache_root, gguf_group, parse_spec
from llmcli.hub.inspect import dir_size, snapshot_ggufs
from llmcli.hub.resolve import find_cached, looks_like_repo, stored_model


@dataclass
class Removal:
    """What `llm rm` will delete; execute() does it."""

    description: str
    freed: int
    paths: list[Path] = field(default_factory=list)  # store models: directory trees or .gguf files
    hub_commits: tuple[str, ...] = ()  # revisions for huggingface_hub's delete strategy
    gguf_pointers: list[Path] = field(default_factory=list)  # one GGUF out of a multi-GGUF snapshot

    def execute(self) -> None:
        for p in self.paths:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        if self.hub_commits:
            scan_cache_dir(cache_root()).delete_revisions(*self.hub_commits).execute()
        for ptr in self.gguf_pointers:
            blob = ptr.resolve()
            shared = blob != ptr and _blob_linked_elsewhere(ptr)
            ptr.unlink()
            if blob != ptr and not shared:
                blob.unlink(missing_ok=True)


def _blob_linked_elsewhere(ptr: Path) -> bool:
    """Whether a snapshot link other than `ptr` points at ptr's blob (the same bytes under another name)."""
    blob = ptr.resolve()
    snapshots = blob.parent.parent / "snapshots"
    return any(p != ptr and p.is_symlink() and p.resolve() == blob for p in snapshots.rglob("*"))


def plan_removal(spec: str) -> Removal:
    if spec.lower() == default_model.NAME:
        raise UserError(
            f"{default_model.NAME} is the embedded default model (used when no model is given and "
            "fetched again automatically); it is not removed by `llm rm`"
        )
    stored = stored_model(spec)
    if stored is not None:
        size = dir_size(stored) if stored.is_dir() else stored.stat().st_size
        return Removal(f"{spec} ({stored})", size, paths=[stored])
    if not looks_like_repo(spec):
        raise UserError(f"no local model named {spec!r} (see `llm list`)")
    repo_id, suffix = parse_spec(spec)
    try:
        cache = scan_cache_dir(cache_root())
    except CacheNotFound:
        cache = None
    repo = next((r for r in (cache.repos if cache else ()) if r.repo_id == repo_id and r.repo_type == "model"), None)
    if repo is None:
        raise UserError(f"{repo_id} is not in the cache ({cache_root()}); see `llm list`")
    if suffix is None:
        commits = tuple(r.commit_hash for r in repo.revisions)
        return Removal(f"{repo_id} (all {len(commits)} revision(s))", repo.size_on_disk, hub_commits=commits)
    try:
        path = find_cached(spec)
    except NotDownloaded:
        raise UserError(f"{spec} is not in the cache; see `llm list`") from None
    commit = (path if path.is_dir() else path.parent).name
    snap = next((r for r in repo.revisions if str(path).startswith(str(r.snapshot_path))), None)
    if is_gguf(path) and snap is not None and len(snapshot_ggufs(Path(snap.snapshot_path))) > 1:
        group = gguf_group(path.name)
        ptrs = [p for p in path.parent.glob("*.gguf") if gguf_group(p.name) == group]
        freed = sum(p.resolve().stat().st_size for p in ptrs if not _blob_linked_elsewhere(p))
        return Removal(f"{spec} ({', '.join(p.name for p in ptrs)})", freed, gguf_pointers=ptrs)
    commit = snap.commit_hash if snap else commit
    strategy = cache.delete_revisions(commit)
    return Removal(f"{repo_id} revision {commit[:12]}", strategy.expected_freed_size, hub_commits=(commit,))
