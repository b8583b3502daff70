"""Built-in GPU table for `llm estimate --gpu NAME`.

Memory is the total a driver reports (`nvidia-smi --query-gpu=memory.total`, MiB), not the marketing
"80GB": an H100 "80GB" exposes 81559 MiB = 79.6 GiB, which is what a model has to fit in.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcli.errors import UserError

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_mib: int

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB


GPUS: tuple[GPU, ...] = (
    GPU("H200", 143771),
    GPU("H100-94GB", 95830),  # H100 NVL
    GPU("H100-80GB", 81559),  # SXM and PCIe
    GPU("A100-80GB", 81920),
    GPU("A100-40GB", 40960),
    GPU("L40S", 46068),
    GPU("L40", 46068),
    GPU("A40", 46068),
    GPU("RTX-6000-Ada", 49140),
    GPU("RTX-A6000", 49140),
    GPU("A10G", 23028),
    GPU("A10", 23028),
    GPU("L4", 23034),
    GPU("RTX-4090", 24564),
    GPU("RTX-3090", 24576),
    GPU("RTX-4080", 16376),
    GPU("RTX-4070-Ti", 12282),
    GPU("RTX-3080", 10240),
    GPU("T4", 15360),
    GPU("V100-32GB", 32510),
    GPU("V100-16GB", 16160),
)

_ALIASES = {
    "H100": "H100-80GB",
    "A100": "A100-80GB",
    "V100": "V100-16GB",
    "4090": "RTX-4090",
    "3090": "RTX-3090",
    "4080": "RTX-4080",
}


def _key(name: str) -> str:
    return "".join(ch for ch in name.upper() if ch.isalnum())


_BY_KEY = {_key(g.name): g for g in GPUS}


def find_gpu(name: str) -> GPU:
    """Case- and punctuation-insensitive lookup ("h100 80gb", "rtx4090"); UserError listing the table otherwise."""
    key = _key(_ALIASES.get(name.upper(), name))
    gpu = _BY_KEY.get(key) or _BY_KEY.get(_key("RTX-" + name))
    if gpu is None:
        raise UserError(f"unknown GPU {name!r}; known: {', '.join(g.name for g in GPUS)} (or use --gpu-memory GiB)")
    return gpu
