"""The local model store and the one resolver every command uses to find a model.

Three places hold models: the Hugging Face cache (repos fetched by `llm pull` or transformers), the
llmcli store (`llm quantize` output, one directory per model in store_dir()) and the embedded default
GGUF. resolve_model(spec) -> Path of a local model directory (config.json + safetensors) or a .gguf file.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmcli.errors import NotDownloaded, UserError
from llmcli.formats import is_gguf

# llama.cpp quant names inside GGUF file names: Q4_K_M, IQ2_XXS, Q8_0, BF16, F16 ...
_QUANT_TAG = re.compile(r"(?i)(?<![a-z0-9])(i?q\d(?:_[a-z0-9]+)*|bf16|f16|f32)(?![a-z0-9])")
_HEX = re.compile(r"[0-9a-f]{7,40}")


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


# ---- reading what a model is, without torch ------------------------------------------------------------


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _tensor_headers(d: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for p in sorted(d.glob("*.safetensors")):
        out.update({k: v for k, v in safetensors_header(p).items() if k != "__metadata__"})
    return out


def gguf_file_type(path: Path) -> str:
    """'GGUF Q4_1' etc., from general.file_type (falls back to the commonest tensor type)."""
    from llmcli.formats.gguf_reader import open_gguf

    reader = open_gguf(path)
    import gguf

    f = reader.fields.get("general.file_type")
    if f is not None:
        try:
            name = gguf.LlamaFileType(int(f.contents())).name
            return "GGUF " + name.removeprefix("MOSTLY_").replace("ALL_", "")
        except (ValueError, TypeError):
            pass
    from collections import Counter

    kinds = Counter(t.tensor_type.name for t in reader.tensors)
    return "GGUF " + kinds.most_common(1)[0][0] if kinds else "GGUF"


def _gguf_params(path: Path) -> int:
    from llmcli.formats.gguf_reader import open_gguf

    return int(sum(int(t.n_elements) for t in open_gguf(path).tensors))


def model_format(path: Path) -> str:
    if is_gguf(path):
        return gguf_file_type(path)
    cfg = json.loads((path / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") == "llmcli":
        return f"int{q.get('bits')}" + (f" g{q['group_size']}" if q.get("group_size") else "")
    if q.get("quant_method") == "bitsandbytes":
        return "nf4" if q.get("bnb_4bit_quant_type", "nf4") == "nf4" and q.get("load_in_4bit", True) else "int8 (bnb)"
    if q.get("quant_method"):
        return str(q["quant_method"])
    dtypes = sorted({v["dtype"].lower().replace("float", "fp") for v in _tensor_headers(path).values()})
    names = {"bf16": "bf16", "f16": "fp16", "f32": "fp32", "fp16": "fp16", "fp32": "fp32"}
    return "safetensors " + "/".join(names.get(d, d) for d in dtypes)


def model_config(path: Path):
    if is_gguf(path):
        from llmcli.formats.gguf_config import load_gguf_config

        return load_gguf_config(path)
    from llmcli.config import load_config

    return load_config(path)


def _estimate_params(config) -> tuple[int | None, int | None]:
    """(total, active) from llmcli.estimate if it is there (it knows every family's tensors)."""
    try:
        from llmcli import estimate
    except ImportError:
        return None, None
    for name in ("count_params", "param_count", "params"):
        fn = getattr(estimate, name, None)
        if callable(fn):
            try:
                r = fn(config)
            except Exception:
                return None, None
            if isinstance(r, tuple):
                return int(r[0]), int(r[1])
            total = getattr(r, "total", r)
            active = getattr(r, "active", total)
            try:
                return int(total), int(active)
            except (TypeError, ValueError):
                return None, None
    return None, None


def model_params(path: Path, config=None) -> tuple[int | None, int | None]:
    """(total, active) parameters: counted from the tensors themselves where they are not packed."""
    if is_gguf(path):
        total = _gguf_params(path)
    else:
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("quantization_config"):  # packed int4/nf4 tensors: count from the architecture instead
            total = None
        else:
            total = 0
            for v in _tensor_headers(path).values():
                n = 1
                for s in v["shape"]:
                    n *= s
                total += n
    est_total, est_active = (None, None)
    if config is not None:
        est_total, est_active = _estimate_params(config)
    total = total or est_total
    # The estimator knows which experts a token skips; keep our exact count and subtract those.
    active = total - (est_total - est_active) if (total and est_total and est_active) else total
    if config is not None and config.is_moe and total and not est_total:
        # Experts a token does not use: (E - k) per MoE layer, each gate+up+down (or fc+proj).
        per_expert = (3 if config.gated_mlp else 2) * config.hidden_size * config.moe_intermediate_size
        moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_layers)) or config.num_layers
        active = total - moe_layers * (config.num_experts - config.num_experts_per_tok) * per_expert
    return total, active


def _dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _loadable_dir(d: Path) -> bool:
    from llmcli.config import SUPPORTED_FAMILIES

    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False
    family = cfg.get("model_type")
    if family == "gemma3" and "text_config" in cfg:
        family = "gemma3_text"
    return family in SUPPORTED_FAMILIES and any(d.glob("*.safetensors"))


def gguf_tag(filename: str) -> str:
    """The Ollama-style tag of a GGUF file name (its quant type), else the file stem."""
    name = filename.rsplit("/", 1)[-1]
    from llmcli.hub.download import gguf_group

    stem = gguf_group(name)[: -len(".gguf")]
    m = _QUANT_TAG.findall(stem)
    return m[-1] if m else stem


def _snapshot_ggufs(snapshot: Path) -> list[Path]:
    """One .gguf per model (the first part of a split file)."""
    from llmcli.hub.download import gguf_group

    seen, out = set(), []
    for p in sorted(snapshot.rglob("*.gguf")):
        g = gguf_group(str(p.relative_to(snapshot)))
        if g not in seen:
            seen.add(g)
            out.append(p)
    return out


# ---- listing ---------------------------------------------------------------------------------------


def _hub_models() -> list[LocalModel]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from llmcli.hub.download import cache_root

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
            base = dict(source="hub", revision=ref or rev.commit_hash[:12], commit=rev.commit_hash,
                        repo_id=repo.repo_id, modified=rev.last_modified)
            if _loadable_dir(snap):
                out.append(LocalModel(name=repo.repo_id + suffix, path=str(snap), format=_safe(model_format, snap),
                                      size=rev.size_on_disk, **base))
            ggufs = _snapshot_ggufs(snap)
            for g in ggufs:
                # Always REPO:TAG (resolvable: a tag that names a GGUF wins); other revisions say which.
                name = f"{repo.repo_id}:{gguf_tag(g.name)}"
                if suffix:
                    name += f"@{ref or rev.commit_hash[:12]}"
                size = sum(f.size_on_disk for f in rev.files if f.file_name.endswith(".gguf")
                           and _same_group(f.file_path, g))
                out.append(LocalModel(name=name, path=str(g), format=_safe(gguf_file_type, g), size=size, **base))
    return out


def _same_group(a: Path, b: Path) -> bool:
    from llmcli.hub.download import gguf_group

    return gguf_group(str(a)) == gguf_group(str(b))


def _safe(fn, *args, default="?"):
    try:
        return fn(*args)
    except Exception:  # a half-written or foreign file must not break `llm list`
        return default


def _store_models() -> list[LocalModel]:
    from llmcli.paths import store_dir

    root = store_dir()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and (d / "config.json").is_file():
            out.append(LocalModel(name=d.name, source="store", path=str(d), format=_safe(model_format, d),
                                  size=_dir_size(d), modified=(d / "config.json").stat().st_mtime))
    return out


def _default_models() -> list[LocalModel]:
    from llmcli.hub import default_model

    p = default_model.find_default_model()
    if p is None:
        return []
    st = p.stat()
    return [LocalModel(name=default_model.NAME, source="default", path=str(p), format=_safe(gguf_file_type, p),
                       size=st.st_size, modified=st.st_mtime)]


def list_models(with_params: bool = True) -> list[LocalModel]:
    models = _default_models() + _store_models() + _hub_models()
    if with_params:
        for m in models:
            p = Path(m.path)
            m.params = _safe(lambda: model_params(p, _safe(model_config, p, default=None))[0], default=None)
    return models


# ---- resolving -------------------------------------------------------------------------------------


def looks_like_repo(spec: str) -> bool:
    repo = spec.partition(":")[0]
    return (repo.count("/") == 1 and not spec.startswith((".", "/", "~")) and all(repo.split("/"))
            and re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo) is not None)


def _pick_in_snapshot(snapshot: Path, spec: str, tag: str | None) -> Path:
    from llmcli.hub.download import match_gguf_tag, RemoteFile

    if _loadable_dir(snapshot) and not tag:
        return snapshot
    ggufs = _snapshot_ggufs(snapshot)
    if tag:
        files = [RemoteFile(str(g.relative_to(snapshot)), 0, "", None) for g in ggufs]
        hits = match_gguf_tag(files, tag)
        if hits:
            return snapshot / hits[0].path
        raise NotDownloaded(spec)
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise UserError(f"{spec} has {len(ggufs)} GGUF files here; name one: "
                        + ", ".join(f"{spec}:{gguf_tag(g.name)}" for g in ggufs))
    if (snapshot / "config.json").is_file():
        return snapshot  # the loader says what is missing
    raise NotDownloaded(spec)


def find_cached(spec: str, revision: str | None = None) -> Path:
    """REPO, REPO:REVISION, REPO:COMMIT or REPO:TAG from the HF cache; NotDownloaded if absent."""
    from llmcli.hub.download import cached_commit, parse_spec, repo_folder

    repo_id, suffix = parse_spec(spec)
    folder = repo_folder(repo_id)
    snapshots = folder / "snapshots"
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
    from llmcli.hub.download import cached_commit

    commit = cached_commit(repo_id, revision)
    if commit is None and revision and _HEX.fullmatch(revision):
        hits = [p.name for p in snapshots.iterdir() if p.name.startswith(revision)]
        commit = hits[0] if len(hits) == 1 else None
    return commit


def resolve_model(spec: str | None) -> Path:
    """None: the embedded default. Else a directory or .gguf, a name from `llm list`, or a Hub repo.

    A Hub repo that is not in the cache raises NotDownloaded (its message is the exact `llm pull` command to run;
    the CLI offers that pull on a terminal), or, with HF_HUB_OFFLINE set, a UserError saying so.
    """
    from llmcli.hub import default_model

    if spec is None or spec.lower() == default_model.NAME:
        return default_model.default_model_path()
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if p.is_file() and is_gguf(p):
        return p
    if p.exists():
        raise UserError(f"{spec} is neither a model directory (with config.json) nor a .gguf file")
    from llmcli.paths import store_dir

    stored = store_dir() / spec
    if "/" not in spec and stored.is_dir() and (stored / "config.json").is_file():
        return stored
    if looks_like_repo(spec):
        try:
            return find_cached(spec)
        except NotDownloaded:
            from huggingface_hub import constants

            if constants.is_offline_mode():
                raise UserError(f"{spec} is not downloaded and HF_HUB_OFFLINE is set; unset it and run "
                                f"`llm pull {spec}`") from None
            raise NotDownloaded(spec) from None
    raise UserError(f"model {spec!r} not found: not a path, a name from `llm list`, or an ORG/NAME Hub repo")


# ---- show ------------------------------------------------------------------------------------------


def _chat_template(path: Path) -> str | None:
    if is_gguf(path):
        from llmcli.formats.gguf_reader import gguf_metadata

        return gguf_metadata(path).get("tokenizer.chat_template")
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("tokenizer_config.json", "chat_template.json"):
        try:
            t = json.loads((path / name).read_text()).get("chat_template")
        except (OSError, ValueError):
            continue
        if t:
            return t if isinstance(t, str) else json.dumps(t)
    return None


def _special_tokens(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if is_gguf(path):
        from llmcli.formats.gguf_reader import gguf_metadata

        meta = gguf_metadata(path)
        tokens = meta.get("tokenizer.ggml.tokens") or []
        for key in ("bos", "eos", "unknown", "padding"):
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            if i is not None and 0 <= int(i) < len(tokens):
                out[{"unknown": "unk", "padding": "pad"}.get(key, key)] = tokens[int(i)]
        return out
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            d = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = d.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and key[:-6] not in out:
                out[key[:-6]] = v
    return out


def _files(path: Path) -> list[tuple[str, int]]:
    if is_gguf(path):
        from llmcli.hub.download import gguf_group

        parts = [p for p in sorted(path.parent.glob("*.gguf")) if gguf_group(p.name) == gguf_group(path.name)]
        return [(p.name, p.stat().st_size) for p in parts]
    return [(str(p.relative_to(path)), p.stat().st_size) for p in sorted(path.rglob("*")) if p.is_file()]


def show_model(path: Path) -> dict:
    """Everything `llm show` prints about a resolved model, as plain data."""
    cfg = model_config(path)
    total, active = model_params(path, cfg)
    template = _chat_template(path)
    files = _files(path)
    quant = model_format(path)
    return {
        "path": str(path),
        "architecture": cfg.family,
        "format": quant,
        "parameters": total,
        "active_parameters": active,
        "context_length": cfg.max_position_embeddings,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "experts": cfg.num_experts or None,
        "experts_per_token": cfg.num_experts_per_tok or None,
        "quantization": None if quant.startswith("safetensors") else quant,
        "chat_template": template is not None,
        "special_tokens": _special_tokens(path),
        "files": [{"name": n, "size": s} for n, s in files],
        "size": sum(s for _, s in files),
    }


# ---- remove ----------------------------------------------------------------------------------------


@dataclass
class Removal:
    """What `llm rm` will delete; execute() does it."""
    description: str
    freed: int
    paths: list[Path] = field(default_factory=list)  # whole trees to delete (store models)
    hub_commits: tuple[str, ...] = ()  # revisions for huggingface_hub's delete strategy
    gguf_pointers: list[Path] = field(default_factory=list)  # one GGUF out of a multi-GGUF snapshot

    def execute(self) -> None:
        import shutil

        from huggingface_hub import scan_cache_dir

        from llmcli.hub.download import cache_root

        for p in self.paths:
            shutil.rmtree(p)
        if self.hub_commits:
            scan_cache_dir(cache_root()).delete_revisions(*self.hub_commits).execute()
        for ptr in self.gguf_pointers:
            blob = ptr.resolve()
            ptr.unlink()
            if blob != ptr and not _blob_linked_elsewhere(blob):
                blob.unlink(missing_ok=True)


def _blob_linked_elsewhere(blob: Path) -> bool:
    snapshots = blob.parent.parent / "snapshots"
    return any(p.is_symlink() and p.resolve() == blob for p in snapshots.rglob("*"))


def plan_removal(spec: str) -> Removal:
    from llmcli.hub import default_model
    from llmcli.paths import store_dir

    if spec.lower() == default_model.NAME:
        raise UserError(f"{default_model.NAME} is the embedded default model (used when no model is given and "
                        "fetched again automatically); it is not removed by `llm rm`")
    stored = store_dir() / spec
    if "/" not in spec and stored.is_dir() and (stored / "config.json").is_file():
        return Removal(f"{spec} ({stored})", _dir_size(stored), paths=[stored])
    if not looks_like_repo(spec):
        raise UserError(f"no local model named {spec!r} (see `llm list`)")
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from llmcli.hub.download import cache_root, gguf_group, parse_spec

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
    if is_gguf(path) and snap is not None and len(_snapshot_ggufs(Path(snap.snapshot_path))) > 1:
        group = gguf_group(path.name)
        ptrs = [p for p in path.parent.glob("*.gguf") if gguf_group(p.name) == group]
        freed = sum(p.resolve().stat().st_size for p in ptrs if not _blob_linked_elsewhere_than(p))
        return Removal(f"{spec} ({', '.join(p.name for p in ptrs)})", freed, gguf_pointers=ptrs)
    commit = snap.commit_hash if snap else commit
    strategy = cache.delete_revisions(commit)
    return Removal(f"{repo_id} revision {commit[:12]}", strategy.expected_freed_size, hub_commits=(commit,))


def _blob_linked_elsewhere_than(ptr: Path) -> bool:
    blob = ptr.resolve()
    snapshots = blob.parent.parent / "snapshots"
    return any(p != ptr and p.is_symlink() and p.resolve() == blob for p in snapshots.rglob("*"))
