"""Human-readable numbers: the one formatter for byte sizes and parameter counts."""
