"""Runs the model over the paged KV cache: allocates the cache and turns a batch into step metadata.

A batch is a list of (sequence, start, end): compute tokens [start, end) of each sequence, whose keys/values
for [0, start) are already cached. Metadata (positions, write slots, block tables, masks) is built once per
step with a few tensor ops and shared by every layer.
"""

from __future__ import annotations

import math
import mmap

import torch
from torch import nn

from llmcli.config import ModelConfig
from llmcli.engine.compiled_step import CompiledDecodeStep
from llmcli.engine.sequence import Sequence
from llmcli.errors import UserError
from llmcli.layers import kv_cache
from llmcli.layers.attention import AttentionMetadata, GatherBuffer, KVView


def kv_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled cache tensor. On CPU it lives in an anonymous memory map: the kernel's zero pages, which
    become resident only where K/V are written, so a pool sized for the whole context costs memory as the
    context fills, not up front (torch.zeros would touch every page). Elsewhere torch.zeros."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    buf = mmap.mmap(-1, max(1, count * dtype.itemsize))  # the tensor keeps the map alive
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        num_blocks: int | list[int],
        block_size: int = 16,
        kv_dtype: str | None = None,
    ):
        """num_blocks: one pool for every layer (an int), or one per layer group, in the order of self.windows
        (full attention first, then each window size; see llmcli.engine.block_manager)."""
        self.model, self.config = model, config
        p = model.model.norm.weight  # compute dtype even when the embedding table is quantized
        self.device, self.dtype = p.device, p.dtype
        self.kv_storage = kv_cache.storage_dtype(kv_dtype, self.dtype, self.device)
        if config.is_mla and self.kv_storage != self.dtype:
            raise UserError(f"--kv-dtype {kv_dtype} is not supported for MLA models (their latent cache); use auto")
        self.windows = sorted({config.layer_window(i) for i in range(config.num_layers)}, key=lambda w: w or 0)
        self.split = not isinstance(num_blocks, int)
        self.group_blocks = list(num_blocks) if self.split else [num_blocks]
        if len(self.group_blocks) != (len(self.windows) if self.split else 1):
            raise ValueError(f"{len(self.group_blocks)} pools for {len(self.windows)} layer groups")
        self.group_of = {w: self.windows.index(w) if self.split else 0 for w in self.windows}
        self.layer_group = [self.group_of[config.layer_window(i)] for i in range(config.num_layers)]
        self.block_size, self.num_blocks = block_size, self.group_blocks[0]
        self.scratch_block = self.num_blocks  # one extra block (per group) takes the writes of padding tokens
        # Per layer [groups, num_blocks + 1, block_size, values / groups] (see ModelConfig.kv_cache_groups), and
        # for int8/fp8 a float32 scale per slot of each group. zeros, not empty: masked-out keys must still be
        # finite or they turn softmax into NaN
        self.caches, self.scales = [], []
        for i in range(config.num_layers):
            g = config.kv_cache_groups(i)
            nb = self.group_blocks[self.layer_group[i]]
            shape = (g, nb + 1, block_size, config.kv_values_per_token(i) // g)
            self.caches.append(kv_zeros(shape, self.kv_storage, self.device))
            scaled = kv_cache.is_scaled(self.kv_storage)
            self.scales.append(kv_zeros(shape[:3], kv_cache.SCALE_DTYPE, self.device) if scaled else None)
        self._bind()
        self.gather = GatherBuffer()  # the batched path's per-layer block gather reuses one output
        self.compiled_step: CompiledDecodeStep | None = None  # set by LLMEngine.set_compile (batch-1 decode)

    def _bind(self) -> None:
        """Point each attention module at this runner's cache (several engines may share one model)."""
        for layer, cache, scales in zip(self.model.model.layers, self.caches, self.scales):
            layer.self_attn.kv_cache = cache
            layer.self_attn.kv_scales = scales
        self.model._cache_owner = self

    def copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """(group, src, dst): copy block src to dst in that group's layers."""
        for group, src, dst in copies:
            for i, (cache, scales) in enumerate(zip(self.caches, self.scales)):
                if self.layer_group[i] != group:
                    continue
                cache[:, dst].copy_(cache[:, src])
                if scales is not None:
                    scales[:, dst].copy_(scales[:, src])

    def kv_bytes_in_use(self, blocks_in_use: list[int]) -> int:
        """Cache bytes of blocks_in_use[g] blocks of each group (values and int8/fp8 scales, every layer)."""
        total = 0
        for i, (cache, scales) in enumerate(zip(self.caches, self.scales)):
            per_block = (cache[:, 0].numel() * cache.element_size()) + (
                scales[:, 0].numel() * scales.element_size() if scales is not None else 0
            )
            total += per_block * blocks_in_use[self.layer_group[i]]
        return total

    def _views(self, tables: list, slots: list, positions: torch.Tensor, starts, ends, batch_tables: list) -> dict:
        """KVView per window; tables/slots/batch_tables are per group (the tensors, and batch row 0's list)."""
        bs, b, q = self.block_size, positions.shape[0], positions.shape[1]
        views = {}
        for w in self.windows:
            g = self.group_of[w]
            if b == 1:
                # Gather only the blocks this window can see, and slice to the exact key range.
                kstart = 0 if w is None else max(0, starts[0] - w + 1)
                first = kstart // bs
                bt = tables[g][:, first : self._nblocks(ends[0])]
                lo, hi = kstart - first * bs, ends[0] - first * bs
                mask = None
                if q > 1:  # bottom-right causal (and windowed) mask for a multi-token query over the cache
                    kpos = torch.arange(kstart, ends[0], device=self.device)
                    qpos = positions[0, :, None]
                    mask = kpos[None, :] <= qpos
                    if w is not None:
                        mask &= qpos - kpos[None, :] < w
                    mask = mask[None, None]
                blocks = batch_tables[g][first : self._nblocks(ends[0])]
                # a fresh single stream gets consecutive blocks: then attention reads a slice, no gather
                consecutive = blocks == list(range(blocks[0], blocks[0] + len(blocks)))
                # queries == keys (nothing cached, no window cut): the mask is plain causal, which SDPA's
                # is_causal path computes without reading it (~1.7x faster at 1500 tokens on CPU)
                causal = q > 1 and starts[0] == kstart and (w is None or q <= w)
                views[w] = KVView(bt, lo, hi, mask, blocks[0] * bs if consecutive else None, causal, slots[g])
            else:
                kmax = max(ends)
                kpos = torch.arange(kmax, device=self.device)
                qpos = positions[:, :, None]
                end_t = torch.tensor(ends, device=self.device)[:, None, None]
                mask = (kpos <= qpos) & (kpos < end_t)
                if w is not None:
                    mask &= qpos - kpos < w
                views[w] = KVView(tables[g][:, : self._nblocks(kmax)], 0, kmax, mask[:, None], slot_mapping=slots[g])
        return views

    def _nblocks(self, n: int) -> int:
        return -(-n // self.block_size)

    def _seq_tables(self, seq: Sequence) -> list[list[int]]:
        return seq.block_tables if self.split else [seq.block_table]

    @torch.inference_mode()
    def forward(self, batch: list[tuple[Sequence, int, int]]) -> torch.Tensor:
        """Hidden states [B, Qmax, hidden] for tokens [start, end) of each sequence (padded to Qmax)."""
        dev, bs = self.device, self.block_size
        b = len(batch)
        qmax = max(e - s for _, s, e in batch)
        starts = [s for _, s, _ in batch]
        ends = [e for _, _, e in batch]
        if getattr(self.model, "_cache_owner", None) is not self:
            self._bind()
        if b == 1 and qmax == 1 and self.compiled_step is not None:  # full-attention models only: one group
            seq, s, _ = batch[0]
            return self.compiled_step(seq.token_ids[s], s, seq.block_table, dev)
        groups = range(len(self.group_blocks))
        tables, slots = [], []
        if b == 1:
            seq, s, e = batch[0]
            ids = torch.tensor([seq.token_ids[s:e]], device=dev)
            positions = torch.arange(s, e, device=dev).unsqueeze(0)
            pos_flat = positions[0]
            for table in self._seq_tables(seq):
                t = torch.tensor([table[: self._nblocks(e)]], device=dev)
                tables.append(t)
                slots.append(t[0, pos_flat // bs] * bs + pos_flat % bs)
        else:
            nb = max(self._nblocks(e) for e in ends)
            ids_l, pos_l = [], []
            for seq, s, e in batch:
                n = e - s
                ids_l.append(seq.token_ids[s:e] + [0] * (qmax - n))
                pos_l.append(list(range(s, e)) + [0] * (qmax - n))
            ids = torch.tensor(ids_l, device=dev)
            positions = torch.tensor(pos_l, device=dev)
            qlens = torch.tensor([e - s for _, s, e in batch], device=dev)
            valid = torch.arange(qmax, device=dev)[None, :] < qlens[:, None]
            for g in groups:
                scratch = self.group_blocks[g]  # this group's padding block
                tab_l = []
                for seq, _, e in batch:
                    t = self._seq_tables(seq)[g][: self._nblocks(e)]
                    tab_l.append(t + [scratch] * (nb - len(t)))
                t = torch.tensor(tab_l, device=dev)
                tables.append(t)
                gs = t.gather(1, positions // bs) * bs + positions % bs
                slots.append(torch.where(valid, gs, scratch * bs).reshape(-1))
        self.model.ensure_positions(max(ends), dev, self.dtype)
        meta = AttentionMetadata(
            positions=positions,
            slot_mapping=slots[0],
            views=self._views(tables, slots, positions, starts, ends, self._seq_tables(batch[0][0])),
            pos_start=starts[0] if b == 1 else None,
            gather=self.gather,
        )
        return self.model(ids, meta)
