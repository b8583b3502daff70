"""Tools that drive the engine: benchmarks, perplexity, calibration."""
