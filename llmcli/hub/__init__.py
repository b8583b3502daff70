"""Where models come from and where they are: the Hugging Face Hub (download), the local store (listing),
what a local model is (inspect), spec -> path (resolve), `llm rm` (remove) and the embedded default model."""
