"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error onto
the columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X of the layer's inputs X.

collect_hessians runs the unquantized model on calibration text (forward hooks on every Linear that will be
quantized; all layers in one pass, i.e. inputs come from the float model, not the partly quantized one).
gptq_quantize then works per weight: damping (1% of the mean diagonal), upper Cholesky factor of H^-1, and
lazy block updates of 128 columns. The column loop is inherent to the algorithm (each column depends on the
error of the previous ones); everything inside it is a whole-row tensor op.
"""

from __future__ import annotations

import torch

from llmcli.quant.int4 import effective_group_size

BLOCK = 128
DAMP = 0.01


def _int4_params(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max grid of a group of columns wg [rows, g], rounded to the fp16 that is stored."""
    lo, hi = wg.amin(dim=1), wg.amax(dim=1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).half().float()
    zero = (-lo / scale).half().float()
    return scale, zero


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [rows, cols], H [cols, cols] -> int8: (q int8, scales fp16 [rows], None);
    int4: (q uint8 0..15 [rows, cols], scales fp16 [rows, G], zeros fp16 [rows, G])."""
    W = w.float().clone()
    rows, cols = W.shape
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += DAMP * torch.diag(H).mean() * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    if bits == 8:
        scale8 = (W.abs().amax(dim=1) / 127.0).clamp(min=1e-8).half().float()
        g = cols
    else:
        g = effective_group_size(cols, group_size or 128)
        scales = torch.zeros(rows, cols // g)
        zeros = torch.zeros(rows, cols // g)
    block = BLOCK if BLOCK % g == 0 or bits == 8 else g
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if bits == 4 and col % g == 0:  # group parameters from the error-updated weights
                s, z = _int4_params(W1[:, i:i + g])
                scales[:, col // g], zeros[:, col // g] = s, z
            wcol = W1[:, i]
            if bits == 8:
                q = torch.round(wcol / scale8).clamp(-127, 127)
                deq = q * scale8
            else:
                q = torch.round(wcol / s + z).clamp(0, 15)
                deq = (q - z) * s
            Q[:, col] = q
            err = (wcol - deq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if bits == 8:
        return Q.to(torch.int8), scale8.half(), None
    return Q.to(torch.uint8), scales.half(), zeros.half()


@torch.inference_mode()
def collect_hessians(src, text: str, spec, max_tokens: int = 2048, window: int = 512) -> dict[str, torch.Tensor]:
    """Engine module name -> H = 2/n X^T X over the calibration tokens, for every Linear the spec quantizes."""
    from llmcli.cli.quantize import encode_text
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.errors import UserError
    from llmcli.quant import quantizable_linears

    ids = encode_text(src, text)[:max_tokens]
    engine = LLMEngine.load(str(src), device="cpu", dtype=torch.float32, tokenizer=False)
    if len(ids) < 16:
        raise UserError("the calibration text is too short (fewer than 16 tokens)")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for name, m in quantizable_linears(engine.model, spec):
        hooks.append(m.register_forward_hook(hook(name)))
    try:
        for s in range(0, len(ids), window):
            chunk = ids[s:s + window]
            seq = engine.add(chunk)
            seq.num_computed = 0
            engine.forward_logits([seq])
            engine.release(seq)
    finally:
        for h in hooks:
            h.remove()
    return {n: 2.0 * sums[n] / counts[n] for n in sums}
