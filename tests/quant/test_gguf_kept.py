"""llmcli.quant.gguf_kept: GGUF blocks -> our quantized modules' tensors, checked against gguf's own dequantization."""

from __future__ import annotations

import gguf
import numpy as np
import torch

from llmcli.formats.gguf_tensors import RawTensor
from llmcli.quant.gguf_kept import REQUANT_ROWS, requantize_q8_0
from llmcli.quant.int8 import quantize_int8


def test_q8_0_requantized_in_chunks_equals_whole_tensor():
    # more rows than one chunk and not a multiple of it: every chunk boundary and a short last chunk
    rows, cols = 2 * REQUANT_ROWS + 37, 96
    w = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    w[5] *= 40.0  # rows of very different ranges: scales are per row, whatever chunk a row is in
    w[REQUANT_ROWS] = 0.0  # an all-zero row at a chunk start (clamped scale)
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    raw = RawTensor("x.weight", q8_0, (rows, cols), gguf.quants.quantize(w, q8_0))
    got = requantize_q8_0(raw)
    q, s = quantize_int8(torch.from_numpy(raw.dequantize().astype(np.float32)))
    assert torch.equal(got["qweight"], q) and torch.equal(got["scales"], s)
