"""Building blocks of the transformer: norms, rotary embeddings, activations, attention, MLPs, MoE, MLA."""
