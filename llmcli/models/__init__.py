"""Model definitions (one configurable transformer)."""
