"""The inference engine: sequences, the paged KV cache, the model runner and the LLMEngine front."""
