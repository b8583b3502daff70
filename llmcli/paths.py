"""Where llmcli keeps its own files (quantized models, the default model, chat history), and how its temporary
outputs are named so that a later run can recognise and remove the ones a killed run left.

Temporary outputs: a file or directory that will become DEST is written as the hidden sibling
`.DEST.llmcli-tmp-PID` (an --force overwrite moves the old DEST aside as `.DEST.llmcli-old-PID` until the new one
is in place), PID being the writing process. Such an entry is stale once no process with that PID is alive:
`remove_stale_temps` deletes exactly those, so two runs at once never delete each other's work. (A PID reused by
an unrelated live process only delays the cleanup until that process ends.) A stale `.DEST.llmcli-old-PID`
whose DEST is missing (the run was killed between the two renames) is the user's previous output: it is renamed
back to DEST, not deleted. Names from older versions
(`.DEST.XXXXXXXX` directories and `.DEST.XXXXXXXX.tmp` files from tempfile, with no PID) are removed when they
were last touched a day ago or more. `llm list` shows no hidden or `.tmp` entry at all (`is_temporary`).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

TEMP_TAG = ".llmcli-tmp-"
_OURS = re.compile(r"^\.(?P<dest>.+)\.llmcli-(?P<kind>tmp|old)-(?P<pid>\d+)$")
_LEGACY = re.compile(r"^\.(?P<dest>.+)\.[a-z0-9_]{8}(?:\.tmp)?$")  # tempfile.mkdtemp/mkstemp(prefix=".DEST.")
LEGACY_AGE_S = 86400


def llmcli_home() -> Path:
    """$LLMCLI_HOME, else $XDG_CACHE_HOME/llmcli, else ~/.cache/llmcli."""
    if os.environ.get("LLMCLI_HOME"):
        return Path(os.environ["LLMCLI_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmcli"


def store_dir() -> Path:
    """Models written by `llm quantize` live here, one directory (or .gguf file) each."""
    return llmcli_home() / "models"


def temp_path(dest: Path) -> Path:
    """Where this process writes what will be renamed onto dest (see the module docstring)."""
    return dest.with_name(f".{dest.name}{TEMP_TAG}{os.getpid()}")


def aside_path(dest: Path) -> Path:
    """Where an existing dest waits while its replacement is renamed into place."""
    return dest.with_name(f".{dest.name}.llmcli-old-{os.getpid()}")


def current_umask() -> int:
    """This process's umask (read without changing it where /proc allows; os.umask otherwise)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_modes(root: Path) -> None:
    """chmod root (and everything under a directory root) to what the user creates: directories 0777 & ~umask,
    files 0666 & ~umask (some writers create 0600 files, e.g. safetensors)."""
    mask = current_umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def is_temporary(name: str) -> bool:
    """A hidden name or a `.tmp` file: never a model to list."""
    return name.startswith(".") or name.endswith(".tmp") or TEMP_TAG in name


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:
        return False
    return True


def _last_touched(p: Path) -> float:
    newest = p.lstat().st_mtime
    if p.is_dir() and not p.is_symlink():
        for q in p.rglob("*"):
            try:
                newest = max(newest, q.lstat().st_mtime)
            except OSError:
                continue
    return newest


def remove_path(p: Path) -> None:
    """Delete a file, link or directory tree (what is already gone is fine)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temporary outputs in directory that no live process is writing; returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    now = time.time()
    for p in entries:
        m = _OURS.match(p.name)
        try:
            if m:
                stale = not _alive(int(m["pid"]))
            else:
                stale = _LEGACY.match(p.name) is not None and now - _last_touched(p) >= LEGACY_AGE_S
        except OSError:
            continue
        if not stale:
            continue
        dest = directory / m["dest"] if m else None
        if m and m["kind"] == "old" and not os.path.lexists(dest):
            os.replace(p, dest)  # killed between the two renames: the previous output comes back
            continue
        remove_path(p)
        removed.append(p)
    return removed
