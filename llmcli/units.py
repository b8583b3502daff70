"""Human-readable numbers: the one formatter for byte sizes and parameter counts."""

from __future__ import annotations

_BINARY = ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))
_COUNT = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))


def format_bytes(n: float, binary: bool = False) -> str:
    """A byte size: decimal "98.4 MB" (one decimal, up to TB), or binary "256.57 MiB" (two decimals, up to TiB).

    Below the first unit it is whole bytes: "512 B".
    """
    if binary:
        for div, unit in _BINARY:
            if abs(n) >= div:
                return f"{n / div:.2f} {unit}"
        return f"{int(n)} B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_count(n: float, significant: bool = False) -> str:
    """A count with a K/M/B/T suffix and one decimal ("134.5M", "8.0B"); below 1000 the number itself ("576").

    `significant`: three significant digits while under 100 of the unit ("8.03B", "1K"), one decimal from there up.
    """
    for div, unit in _COUNT:
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{unit}" if significant and v < 100 else f"{v:.1f}{unit}"
    return f"{n:.0f}"
