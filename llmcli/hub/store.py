"""The models on this machine, from the three places they live (what `llm list` shows).

The Hugging Face cache (repos fetched by `llm pull` or transformers), the llmcli store (`llm quantize`
output in store_dir(): a directory or a .gguf file per model) and the embedded default GGUF. Temporary
outputs (hidden names, `.tmp` files: llmcli.paths.is_temporary) are never listed, wherever they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from llmcli.formats import is_gguf
from llmcli.hub import default_model
from llmcli.hub.download import cache_root, gguf_group
from llmcli.hub.inspect import (
    dir_size,
    gguf_file_type,
    gguf_tag,
    loadable_dir,
    model_config,
    model_format,
    model_params,
    snapshot_ggufs,
)
from llmcli.paths import is_temporary, remove_stale_temps, store_dir


@dataclass
class LocalModel:
    name: str  # what `llm run NAME` accepts
    source: str  # "hub" | "store" | "default"
    path: str  # model directory or .gguf file
    format: str
    size: int  # bytes on disk
    modified: float  # unix time
    revision: str | None = None
    commit: str | None = None
    repo_id: str | None = None
    params: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _safe(fn: Callable[..., Any], *args: Any, default: Any = "?") -> Any:
    try:
        return fn(*args)
    except Exception:  # a half-written or foreign file must not break `llm list`
        return default


def _hub_models() -> list[LocalModel]:
    try:
        info = scan_cache_dir(cache_root())
    except CacheNotFound:
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: -r.last_modified):
            snap = Path(rev.snapshot_path)
            refs = sorted(rev.refs)
            ref = "main" if "main" in refs else (refs[0] if refs else None)
            suffix = "" if ref == "main" else f":{ref or rev.commit_hash[:12]}"
            base = dict(
                source="hub",
                revision=ref or rev.commit_hash[:12],
                commit=rev.commit_hash,
                repo_id=repo.repo_id,
                modified=rev.last_modified,
            )
            if loadable_dir(snap):
                out.append(
                    LocalModel(
                        name=repo.repo_id + suffix,
                        path=str(snap),
                        format=_safe(model_format, snap),
                        size=rev.size_on_disk,
                        **base,
                    )
                )
            for g in snapshot_ggufs(snap):
                if any(is_temporary(part) for part in g.relative_to(snap).parts):
                    continue
                # Always REPO:TAG (resolvable: a tag that names a GGUF wins); other revisions say which.
                name = f"{repo.repo_id}:{gguf_tag(g.name)}"
                if suffix:
                    name += f"@{ref or rev.commit_hash[:12]}"
                size = sum(
                    f.size_on_disk
                    for f in rev.files
                    if is_gguf(f.file_name) and gguf_group(str(f.file_path)) == gguf_group(str(g))
                )
                out.append(LocalModel(name=name, path=str(g), format=_safe(gguf_file_type, g), size=size, **base))
    return out


def _store_models() -> list[LocalModel]:
    root = store_dir()
    if not root.is_dir():
        return []
    # What a killed `llm quantize` left: its temporaries go, an output it had moved aside comes back.
    remove_stale_temps(root)
    out = []
    for d in sorted(root.iterdir()):
        if is_temporary(d.name):
            continue
        if d.is_dir() and (d / "config.json").is_file():
            size, modified = dir_size(d), (d / "config.json").stat().st_mtime
        elif d.is_file() and is_gguf(d):  # `llm quantize --format gguf`: its file name is its name
            st = d.stat()
            size, modified = st.st_size, st.st_mtime
        else:
            continue
        out.append(
            LocalModel(
                name=d.name,
                source="store",
                path=str(d),
                format=_safe(model_format, d),
                size=size,
                modified=modified,
            )
        )
    return out


def _default_models() -> list[LocalModel]:
    p = default_model.find_default_model()
    if p is None:
        return []
    st = p.stat()
    return [
        LocalModel(
            name=default_model.NAME,
            source="default",
            path=str(p),
            format=_safe(gguf_file_type, p),
            size=st.st_size,
            modified=st.st_mtime,
        )
    ]


def _total_params(path: Path) -> int | None:
    return model_params(path, _safe(model_config, path, default=None))[0]


def list_models() -> list[LocalModel]:
    """The default model, then the store, then the HF cache, each with its parameter count where readable."""
    models = _default_models() + _store_models() + _hub_models()
    for m in models:
        m.params = _safe(_total_params, Path(m.path), default=None)
    return models
