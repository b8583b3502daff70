"""The Hugging Face Hub (download), the local model store and the embedded default model."""
