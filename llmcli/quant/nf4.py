"""NF4 (4-bit NormalFloat, blocksize 64, double quantization) in the bitsandbytes checkpoint layout, and the
engine's NF4 linear that runs such checkpoints.

On disk (what transformers + bitsandbytes load), per quantized Linear:
  <module>.weight (uint8 [out * in / 2, 1]: the row-major flattened codes, first of each pair in the high
  nibble), .weight.absmax (uint8: each 64-block's scale, itself 8-bit quantized), .weight.quant_map (the 16
  NF4 values), .weight.nested_absmax / .weight.nested_quant_map (the scales' own blockwise-256 quantization),
  .weight.quant_state.bitsandbytes__nf4 (JSON: shape, blocksize, the scales' mean `nested_offset`).
bitsandbytes 0.50 quantizes and dequantizes NF4 on CPU, so writing needs no GPU.

Which codes and scales are stored is free within that format: quantize_nf4_tensor picks codes for each
block's scale as it will be read back (after the nested quantization), and with a Hessian from calibration
text (`llm quantize --method nf4 --calibration FILE`) searches each block's scale against the input-weighted
error and places codes by GPTQ error compensation (SmolLM2: perplexity +3% instead of +35%).

The engine's NF4Linear: bitsandbytes' per-tensor nested state (the offset is the mean over one tensor's
scales) cannot be concatenated across the engine's fused q/k/v and gate/up rows, so the module decodes the
nested quantization of each shard at load time into plain fp32 scales per 64-block. The packed codes do
concatenate (flattened row-major, blocks never straddle rows), so `weight` takes the loader's ordinary fused
row copy. Compute: see NF4Linear.
"""

from __future__ import annotations

import json
import logging

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.errors import UserError
from llmcli.models.transformer import Transformer
from llmcli.models.weights import fused_shards
from llmcli.quant import QuantSpec, quantizable_linears
from llmcli.quant.gptq import gptq_quantize_grid
from llmcli.quant.linear import frozen_param

# bitsandbytes' CPU backend logs a warning on import when the optional `kernels` package (a faster gemm it
# downloads from the Hub) is absent; its built-in AVX512 kernel, which NF4Linear uses, works without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
STATE_KEY = "weight.quant_state.bitsandbytes__nf4"


def bnb_quantization_config() -> dict:
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": ["lm_head"],
        "llm_int8_threshold": 6.0,
    }


def nf4_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear modules NF4 quantizes: INT4's choice (decoder-layer projections) whose rows are whole
    64-blocks, so no block straddles two rows or two fused shards. Writer and engine both use this."""
    chosen = quantizable_linears(model, QuantSpec(bits=4, group_size=64, method="rtn"))
    return [(n, m) for n, m in chosen if m.in_features % BLOCKSIZE == 0]


def nf4_targets(config) -> dict:
    """Engine module name -> its NF4Linear, built on the meta device (what the checkpoint writer quantizes)."""
    with torch.device("meta"):
        model = Transformer(config)
        return {name: make_nf4_linear(config, name, m) for name, m in nf4_linears(model)}


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values (bitsandbytes' table), ascending, fp32."""
    from bitsandbytes.functional import get_4bit_type  # noqa: PLC0415  (bitsandbytes is heavy: loaded only for NF4)

    return get_4bit_type("nf4", device="cpu").float()


# ---- quantization --------------------------------------------------------------------------------------------
def nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 value for each x (code ascending): compare against the midpoints."""
    mids = (code[1:] + code[:-1]) / 2
    return torch.bucketize(x, mids)


def nested_roundtrip(absmax: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """fp32 block scales -> (the scales as bitsandbytes will read them back, the nested state parts)."""
    import bitsandbytes.functional as bnbf  # noqa: PLC0415  (bitsandbytes is heavy: loaded only for NF4)

    offset = absmax.mean()
    q8, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    back = bnbf.dequantize_blockwise(q8, state2) + offset
    return back.float(), {"q8": q8, "state2": state2, "offset": offset}


def search_block_scales(
    wb: torch.Tensor, code: torch.Tensor, ratios: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """wb [B, 64] -> per-block scale among absmax * ratios minimising the (optionally column-weighted)
    squared reconstruction error. All ratios are tried in one batched op per ratio (not per block)."""
    amax = wb.abs().amax(dim=-1).clamp(min=1e-12)
    best_err = torch.full_like(amax, float("inf"))
    best = amax.clone()
    for r in ratios.tolist():
        s = amax * r
        deq = code[nearest_code(wb / s[:, None], code)] * s[:, None]
        e = (deq - wb).pow(2)
        err = (e * weight).sum(-1) if weight is not None else e.sum(-1)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best


SCALE_RATIOS = torch.linspace(0.80, 1.10, 31)


def quantize_nf4_tensor(
    w: torch.Tensor, hessian: torch.Tensor | None = None, search: bool | None = None
) -> dict[str, torch.Tensor]:
    """w [out, in] -> {suffix: tensor} in the bitsandbytes layout. hessian: GPTQ code placement against the
    layer's calibration inputs; search: per-block scale search weighted by the Hessian's diagonal (default: only
    with a Hessian -- unweighted, the squared-error optimum measured slightly worse perplexity on SmolLM2 than
    bitsandbytes' absmax, 32.28 vs 32.14)."""
    from bitsandbytes.functional import QuantState  # noqa: PLC0415  (bitsandbytes is heavy: loaded only for NF4)

    out_f, in_f = w.shape
    if (out_f * in_f) % BLOCKSIZE:
        raise UserError(f"NF4 needs the weight's size to be a multiple of {BLOCKSIZE}, got {tuple(w.shape)}")
    # bitsandbytes quantizes the bf16 weight; start from the same values so absmax agrees with its own
    wf = w.to(torch.bfloat16).float()
    code = nf4_code()
    wb = wf.reshape(-1, BLOCKSIZE)
    if search is None:
        search = hessian is not None
    if search:
        diag = None
        if hessian is not None and in_f % BLOCKSIZE == 0:
            diag = torch.diag(hessian).float().clamp(min=0).reshape(-1, BLOCKSIZE).repeat(out_f, 1)
        scales = search_block_scales(wb, code, SCALE_RATIOS, diag)
    else:
        scales = wb.abs().amax(dim=-1)
    stored, nested = nested_roundtrip(scales)  # choose codes for the scale that will actually be read back
    if hessian is not None and in_f % BLOCKSIZE == 0:
        idx = gptq_quantize_grid(wf, hessian, stored.reshape(out_f, -1), code, BLOCKSIZE)
    else:
        idx = nearest_code(wb / stored.clamp(min=1e-12)[:, None], code).reshape(out_f, in_f)
    flat = idx.reshape(-1).to(torch.uint8)
    packed = (flat[0::2] << 4 | flat[1::2]).reshape(-1, 1)
    state = QuantState(
        absmax=nested["q8"],
        shape=torch.Size(w.shape),
        code=code,
        blocksize=BLOCKSIZE,
        quant_type="nf4",
        dtype=torch.bfloat16,
        offset=nested["offset"],
        state2=nested["state2"],
    )
    parts = {"weight": packed}
    for k, v in state.as_dict(packed=True).items():
        parts[f"weight.{k}"] = v
    return parts


def dequantize_nf4_tensor(
    parts: dict[str, torch.Tensor], device: str = "cpu", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """bitsandbytes' own dequantization of one stored tensor (the reference our engine is tested against);
    dtype overrides the stored compute dtype (bf16), e.g. fp32 for exact comparisons."""
    import bitsandbytes.functional as bnbf  # noqa: PLC0415  (bitsandbytes is heavy: loaded only for NF4)
    from bitsandbytes.functional import QuantState  # noqa: PLC0415

    qs = {k.removeprefix("weight."): v for k, v in parts.items() if k != "weight"}
    state = QuantState.from_dict(qs, device=torch.device(device))
    if dtype is not None:
        state.dtype = dtype
    return bnbf.dequantize_4bit(parts["weight"], state)


def decode_absmax(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """A shard's scale tensors -> (fp32 scale per block, its JSON quant state), without bitsandbytes:
    nested: scale = nested_quant_map[absmax] * nested_absmax[block // 256] + nested_offset."""
    state = json.loads(bytes(parts[STATE_KEY].tolist()).decode())
    if state.get("quant_type") != "nf4":
        raise UserError(f"bitsandbytes quant_type {state.get('quant_type')!r} is not supported (only nf4)")
    absmax = parts["weight.absmax"]
    if "nested_offset" not in state:
        return absmax.float(), state
    nb = int(state.get("nested_blocksize", NESTED_BLOCKSIZE))
    vals = parts["weight.nested_quant_map"].float()[absmax.long()]
    n = vals.numel()
    scale = parts["weight.nested_absmax"].float().repeat_interleave(nb)[:n]
    return vals * scale + float(state["nested_offset"]), state


# ---- the engine's module -------------------------------------------------------------------------------------
class NF4Linear(nn.Module):
    """y = x @ W.T with W[block] = code[q] * absmax[block] per 64 consecutive values of the flattened weight.

    Parameters: `weight` (the checkpoint's packed codes, filled by the loader's fused row copy), `absmax`
    (decoded fp32 scales, filled by load_hf_weight), `code` (the 16 NF4 values), `bias`.
    Compute: bitsandbytes' AVX512-BF16 CPU kernel (bf16 activations) on its own repacked layout, built once by
    finalize, when the CPU has it: measured (benchmarks/nf4_linear.py, SmolLM2 shapes, 1 thread) as fast as
    a dense fp32 matmul from 1 to 256 rows, and 2-40x faster than bitsandbytes' generic matmul_4bit or a
    torch dequantize-then-matmul. Otherwise (other devices or CPUs) the weight is dequantized in torch (a
    16-entry table lookup times the block scale: bitsandbytes' fp32 arithmetic exactly) for a dense matmul.
    """

    def __init__(self, in_features: int, out_features: int, shards: list[int], bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.shards = in_features, out_features, shards
        self.weight = frozen_param(out_features * in_features // 2, 1, dtype=torch.uint8)
        self.absmax = frozen_param(out_features * in_features // BLOCKSIZE, dtype=torch.float32)
        self.code = frozen_param(16, dtype=torch.float32)
        self.bias = frozen_param(out_features, dtype=torch.get_default_dtype()) if bias else None
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._done: set[int] = set()
        self._kernel: dict | None = None

    # -- loading --
    def load_hf_weight(self, suffix: str, tensor: torch.Tensor, shard: int = 0) -> bool:
        """Collect one shard's scale tensors; decode them into absmax rows once the shard is complete."""
        if not suffix.startswith("weight."):
            return False
        parts = self._pending.setdefault(shard, {})
        parts[suffix] = tensor
        if STATE_KEY not in parts or "weight.absmax" not in parts:
            return True
        state = json.loads(bytes(parts[STATE_KEY].tolist()).decode())
        if "nested_offset" in state and not {"weight.nested_absmax", "weight.nested_quant_map"} <= parts.keys():
            return True
        self._finish_shard(shard, self._pending.pop(shard))
        return True

    def _finish_shard(self, shard: int, parts: dict[str, torch.Tensor]) -> None:
        absmax, state = decode_absmax(parts)
        rows = self.shards[shard]
        if int(state.get("blocksize", 0)) != BLOCKSIZE or list(state.get("shape", [])) != [rows, self.in_features]:
            raise UserError(
                f"NF4 tensor with blocksize {state.get('blocksize')} and shape {state.get('shape')}: "
                f"expected blocksize {BLOCKSIZE} and shape {[rows, self.in_features]}"
            )
        per_row = self.in_features // BLOCKSIZE
        lo = sum(self.shards[:shard]) * per_row
        with torch.no_grad():
            self.absmax[lo : lo + rows * per_row].copy_(absmax)
            if "weight.quant_map" in parts:
                self.code.copy_(parts["weight.quant_map"].float())
        self._done.add(shard)
        if len(self._done) == len(self.shards):
            self.absmax._llmcli_loaded = self.code._llmcli_loaded = True

    # -- compute --
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        packed = self.weight.reshape(-1)
        idx = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1, BLOCKSIZE).long()
        w = self.code[idx] * self.absmax.unsqueeze(-1)
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def finalize(self) -> None:
        if self._kernel is None:
            self._kernel = self._prepare()

    def _prepare(self) -> dict:
        k: dict = {"bnb": None}
        if self.weight.device.type != "cpu" or self.out_features % 32:
            return k
        try:
            import bitsandbytes.functional as bnbf  # noqa: PLC0415  (bitsandbytes is heavy: loaded only for NF4)

            if not bnbf.has_avx512bf16():
                return k
            state = bnbf.QuantState(
                absmax=self.absmax.detach().clone(),
                shape=torch.Size((self.out_features, self.in_features)),
                code=self.code.detach().clone(),
                blocksize=BLOCKSIZE,
                quant_type="nf4",
                dtype=torch.bfloat16,
            )
            k["bnb"] = bnbf._convert_weight_packed_for_cpu(self.weight.detach().clone(), state)
        except (ImportError, AttributeError, RuntimeError, AssertionError):
            k["bnb"] = None  # no bitsandbytes CPU kernel here: torch dequantization instead
        return k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None:
            self.finalize()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._kernel["bnb"] is not None:
            import bitsandbytes as bnb  # noqa: PLC0415  (bitsandbytes is heavy: loaded only for NF4)

            packed, state = self._kernel["bnb"]
            y = bnb.matmul_4bit(x2.to(torch.bfloat16), packed, state).to(x.dtype)
        else:
            dt = x.dtype if x.dtype != torch.float16 or x.is_cuda else torch.float32
            y = F.linear(x2.to(dt), self.dequantize(dt)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, blocksize={BLOCKSIZE}"


def make_nf4_linear(config, name: str, m: nn.Linear) -> NF4Linear:
    leaf = name.rpartition(".")[2]
    if leaf == "qkv_proj":
        shards = fused_shards(config, leaf)
    elif leaf == "gate_up_proj":
        shards = [m.out_features // 2] * 2
    else:
        shards = [m.out_features]
    return NF4Linear(m.in_features, m.out_features, shards, m.bias is not None)
