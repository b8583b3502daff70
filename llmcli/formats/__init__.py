"""File formats: safetensors and GGUF reading."""
