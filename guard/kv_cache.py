"""KV cache slots for many live sessions, and the layout of one batched step over them.

Every session owns one slot of a pooled tensor ``[layers, slots, kv_heads, capacity, head_dim]``.
Its prompt is written once; each later chunk appends only its own keys and values, so a chunk
costs its own tokens whatever the length of the response. The pool grows by doubling (slots
and capacity) up to the configured limits and is released when the last session closes.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepRow:
    """One session's contribution to a step: ``length`` new tokens after ``start`` cached ones."""

    slot: int
    start: int
    length: int


class StepLayout:
    """Index tensors shared by every layer of one step.

    Tokens travel packed (``[N, ...]``, no padding) through the projections and the MLP; only
    attention sees the padded ``[B, heads, T_max, head_dim]`` form, with a mask that lets each
    query attend to its own session's cache up to its own position.
    """

    def __init__(self, rows: list[StepRow], device: torch.device) -> None:
        self.rows = rows
        self.batch = len(rows)
        self.max_new = max(r.length for r in rows)
        self.key_len = max(r.start + r.length for r in rows)
        # Index lists are built in Python (a few hundred ints) and turned into tensors once:
        # on the per-token path this is cheaper than composing them from small tensor ops.
        row_idx, col_idx, positions, slot_of_token = [], [], [], []
        for b, r in enumerate(rows):
            row_idx += [b] * r.length
            col_idx += range(r.length)
            positions += range(r.start, r.start + r.length)
            slot_of_token += [r.slot] * r.length
        self.positions = torch.tensor(positions, device=device)  # [N] absolute positions
        self.slot_of_token = torch.tensor(slot_of_token, device=device)  # [N]
        self.row_idx = torch.tensor(row_idx, device=device)
        self.col_idx = torch.tensor(col_idx, device=device)
        first = rows[0].slot
        contiguous = all(r.slot == first + i for i, r in enumerate(rows))
        self.slot_range = slice(first, first + self.batch) if contiguous else None
        self.slots = torch.tensor([r.slot for r in rows], device=device)
        self.mask = self._attention_mask(device)
        self._grouped: dict[int, torch.Tensor] = {}

    def _attention_mask(self, device: torch.device) -> torch.Tensor | None:
        """Bool ``[B, 1, T_max, key_len]`` (True = attend), or None when nothing needs masking."""
        if self.max_new == 1 and all(r.start + 1 == self.key_len for r in self.rows):
            return None  # one token per row, all at the same length: every cached key is visible
        starts = torch.tensor([r.start for r in self.rows], device=device)
        t = torch.arange(self.max_new, device=device)
        j = torch.arange(self.key_len, device=device)
        limit = starts[:, None] + t[None, :]  # [B, T] last visible key per query
        # Padding queries (t >= length) see stale but finite keys; their outputs are dropped.
        return (j[None, None, :] <= limit[:, :, None])[:, None]  # [B, 1, T, K]

    def grouped_mask(self, group: int) -> torch.Tensor | None:
        """The mask for ``group`` query heads per KV head stacked as rows: ``[B, 1, group*T_max, key_len]``."""
        if self.mask is None or group == 1:
            return self.mask
        if group not in self._grouped:
            b, _, t, k = self.mask.shape
            self._grouped[group] = self.mask[:, :, None].expand(b, 1, group, t, k).reshape(b, 1, group * t, k)
        return self._grouped[group]

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """``[N, H, D]`` -> ``[B, H, T_max, D]``."""
        if self.batch == 1:
            return packed.unsqueeze(0).transpose(1, 2)
        out = packed.new_zeros(self.batch, self.max_new, *packed.shape[1:])
        out[self.row_idx, self.col_idx] = packed
        return out.transpose(1, 2)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """``[B, H, T_max, D]`` -> ``[N, H, D]``."""
        if self.batch == 1:
            return padded[0].transpose(0, 1)
        return padded.transpose(1, 2)[self.row_idx, self.col_idx]


class CacheFull(RuntimeError):
    """No free slot, or a session asked for more tokens than the pool may hold."""


class KVCachePool:
    """Pooled K/V storage: ``[layers, slots, kv_heads, capacity, head_dim]`` for K and for V.

    Memory is ``slots x capacity`` positions, where capacity follows the longest live session
    (power of two); ``max_bytes`` caps it, and a session whose growth would exceed the cap is
    refused rather than the process running out of memory.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        max_slots: int,
        max_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
        max_bytes: int | None = None,
        initial_slots: int = 4,
        initial_tokens: int = 256,
    ) -> None:
        self.shape_tail = (num_kv_heads, head_dim)
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.max_tokens = max_tokens
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.device = device
        self._initial = (min(initial_slots, max_slots), min(initial_tokens, max_tokens))
        self._free: list[int] = []
        self._next_slot = 0
        self.live = 0
        self.k = self.v = torch.empty(0)
        self._allocate_storage(0, 0)

    @property
    def slot_capacity(self) -> int:
        return self.k.shape[1]

    @property
    def token_capacity(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def bytes_for(self, slots: int, tokens: int) -> int:
        per_position = 2 * self.num_layers * self.shape_tail[0] * self.shape_tail[1] * self.dtype.itemsize
        return slots * tokens * per_position

    def _allocate_storage(self, slots: int, tokens: int) -> None:
        if self.max_bytes is not None and self.bytes_for(slots, tokens) > self.max_bytes:
            raise CacheFull(
                f"the KV cache would need {self.bytes_for(slots, tokens) / 2**20:.0f} MiB "
                f"({slots} slots x {tokens} positions); the budget is {self.max_bytes / 2**20:.0f} MiB"
            )
        shape = (self.num_layers, slots, self.shape_tail[0], tokens, self.shape_tail[1])
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.k.numel():
            old_slots, old_tokens = self.k.shape[1], self.k.shape[3]
            k[:, :old_slots, :, :old_tokens] = self.k
            v[:, :old_slots, :, :old_tokens] = self.v
        self.k, self.v = k, v

    def allocate(self) -> int:
        """Take the lowest free slot (low slots keep batches contiguous, so reads are views)."""
        if self._free:
            slot = heapq.heappop(self._free)
        elif self._next_slot < self.max_slots:
            slot = self._next_slot
            self._next_slot += 1
        else:
            raise CacheFull(f"all {self.max_slots} KV cache slots are in use")
        if slot >= self.slot_capacity:
            grown = min(self.max_slots, max(self._initial[0], 2 * self.slot_capacity, slot + 1))
            self._allocate_storage(grown, self.token_capacity or self._initial[1])
        self.live += 1
        return slot

    def free(self, slot: int) -> None:
        heapq.heappush(self._free, slot)
        self.live -= 1
        if self.live == 0:  # idle: give the memory back
            self._free.clear()
            self._next_slot = 0
            self.k = self.v = torch.empty(0)
            self._allocate_storage(0, 0)

    def reserve_tokens(self, tokens: int) -> None:
        """Make every slot able to hold ``tokens`` positions."""
        if tokens > self.max_tokens:
            raise CacheFull(f"{tokens} tokens exceed the per-session limit of {self.max_tokens}")
        if tokens > self.token_capacity:
            grown = self._initial[1]
            while grown < tokens:
                grown *= 2
            self._allocate_storage(self.slot_capacity, min(grown, self.max_tokens))

    def write(self, layer: int, layout: StepLayout, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new keys/values ``[N, kv_heads, D]`` at their slots and positions."""
        if layout.batch == 1:  # one row: a plain slice copy
            r = layout.rows[0]
            self.k[layer, r.slot, :, r.start : r.start + r.length] = k.transpose(0, 1)
            self.v[layer, r.slot, :, r.start : r.start + r.length] = v.transpose(0, 1)
            return
        self.k[layer][layout.slot_of_token, :, layout.positions] = k
        self.v[layer][layout.slot_of_token, :, layout.positions] = v

    def read(self, layer: int, layout: StepLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``[B, kv_heads, key_len, D]`` of the step's rows (a view when slots are contiguous)."""
        n = layout.key_len
        if layout.slot_range is not None:
            return self.k[layer, layout.slot_range, :, :n], self.v[layer, layout.slot_range, :, :n]
        k = self.k[layer, :, :, :n].index_select(0, layout.slots)
        v = self.v[layer, :, :, :n].index_select(0, layout.slots)
        return k, v
