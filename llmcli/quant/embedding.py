"""Quantized token embeddings (`--quantize-embeddings`): a lookup that gathers rows and dequantizes only them.

The table [vocab, hidden] uses exactly the layouts of the quantized linears (llmcli.quant.int8 / int4): a row
of the embedding is an output channel of the lm_head, so INT8 is symmetric per row and INT4 is group-wise
along the row. That is what lets a tied model store ONE quantized table: the loader makes the quantized
lm_head (Int8Linear / Int4Linear) share these very parameters (tie_quantized_head), and the same bytes serve
both the lookup here and the head's weight-only kernel.

A lookup reads only the rows of the ids it is given, so dequantizing costs O(tokens * hidden), never the
whole table.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcli.estimate import effective_group_size
from llmcli.quant.int4 import dequantize_int4, unpack_int4
from llmcli.quant.linear import frozen_param


class QuantEmbedding(nn.Module):
    """Shared plumbing. The output dtype is the model's compute dtype, captured at construction: the loader
    builds the model under torch.set_default_dtype(dtype), and no stored tensor here has that dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.out_dtype = torch.get_default_dtype()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Int8Embedding(QuantEmbedding):
    """row = qweight[id] * scales[id]: int8 symmetric per row (= per output channel of a tied head)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        self.qweight = frozen_param(num_embeddings, embedding_dim, dtype=torch.int8)
        self.scales = frozen_param(num_embeddings, dtype=torch.float16)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        # same arithmetic as dequantize_int8 (fp32 product, then cast) so a lookup equals the dequantized row
        return (self.qweight[ids].float() * self.scales[ids].float().unsqueeze(-1)).to(self.out_dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.rows(torch.arange(self.num_embeddings, device=self.qweight.device)).to(dtype)


class Int4Embedding(QuantEmbedding):
    """row = (q[id] - zeros[id]) * scales[id] per group of group_size columns (packed two per byte)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int):
        super().__init__(num_embeddings, embedding_dim)
        self.group_size = group_size
        n_groups = embedding_dim // group_size
        self.qweight = frozen_param(num_embeddings, embedding_dim // 2, dtype=torch.uint8)
        self.scales = frozen_param(num_embeddings, n_groups, dtype=torch.float16)
        self.zeros = frozen_param(num_embeddings, n_groups, dtype=torch.float16)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_int4(unpack_int4(self.qweight[ids]), self.scales[ids], self.zeros[ids], self.out_dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(unpack_int4(self.qweight), self.scales, self.zeros, dtype)


class HalfEmbedding(QuantEmbedding):
    """row = weight[id] from an fp16 table (a GGUF's F16 token embedding, exact in fp16): half the memory of the
    expanded fp32 table, and a tied HalfLinear head reads the same bytes (tie_quantized_head)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        self.weight = frozen_param(num_embeddings, embedding_dim, dtype=torch.float16)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.out_dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)


def make_quant_embedding(m: nn.Embedding, bits: int, group_size: int) -> QuantEmbedding:
    if bits == 8:
        return Int8Embedding(m.num_embeddings, m.embedding_dim)
    # the same rule as a linear with in_features = hidden, so a tied head's Int4Linear matches this table
    return Int4Embedding(m.num_embeddings, m.embedding_dim, effective_group_size(m.embedding_dim, group_size))


def tie_quantized_head(model: nn.Module) -> None:
    """Make a quantized lm_head use the quantized embedding's tensors (tied models store the table once).

    Called after the model is materialised (to_empty gives tied meta parameters separate storage)."""
    emb, head = model.model.embed_tokens, model.lm_head
    for name in ("qweight", "scales", "zeros", "weight"):
        if hasattr(emb, name):
            setattr(head, name, getattr(emb, name))
    if hasattr(head, "_kernel"):
        head._kernel = None  # any kernel layout built so far came from the untied tensors
