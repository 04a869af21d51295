"""KV cache slots for many live sessions, and the layout of one batched step over them.

Every session owns one slot of a pooled tensor ``[layers, slots, kv_heads, capacity, head_dim]``.
Its prompt is written once; each later chunk appends only its own keys and values, so a chunk
costs its own tokens whatever the length of the response. The pool grows by doubling (slots
and capacity) up to the configured limits, or by as much as the byte budget allows, and is
released when the last session closes.
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
    """Pooled K/V storage: per layer, ``[slots, kv_heads, capacity, head_dim]`` for K and for V.

    Memory is ``slots x capacity`` positions, where capacity follows the longest live session;
    ``max_bytes`` caps what the pool ever holds, growth included, and a session whose growth
    would exceed the cap is refused rather than the process running out of memory.

    Growth replaces one layer's K (or V) tensor at a time, so while it copies the pool holds the
    new storage plus one old tensor, not old and new in full: at most
    ``bytes_for(new) + nbytes() / (2 * layers)``. That peak is what the budget is checked against.

    When the last session leaves, what grew beyond the first allocation (``initial_slots x
    initial_tokens``) is given back; the first allocation is kept (``keep_idle``), so the next
    session after a quiet spell does not allocate on its way in (one stream's open: p50 0.81x,
    p90 0.62x, benchmarks/open_bench.py). ``keep_idle=False`` gives everything back.
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
        keep_idle: bool = True,
    ) -> None:
        self.shape_tail = (num_kv_heads, head_dim)
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.max_tokens = max_tokens
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.device = device
        self._initial = (min(initial_slots, max_slots), min(initial_tokens, max_tokens))
        self.keep_idle = keep_idle
        self._free: list[int] = []
        self._next_slot = 0
        self.live = 0
        self._slots = self._tokens = 0
        self._held = 0  # bytes of the tensors alive now (K and V, every layer, old ones mid-growth)
        self.peak_bytes = 0  # the most ever held at once, growth included
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._replace_storage(0, 0)

    @property
    def slot_capacity(self) -> int:
        return self._slots

    @property
    def token_capacity(self) -> int:
        return self._tokens

    @property
    def free_slots(self) -> int:
        """Slot indices a session can still take (``live + free_slots == max_slots``)."""
        return len(self._free) + self.max_slots - self._next_slot

    def nbytes(self) -> int:
        return self._held

    @property
    def idle_bytes(self) -> int:
        """The most the pool keeps with no session: its first allocation, or 0 without keep_idle."""
        return self.bytes_for(*self._initial) if self.keep_idle else 0

    def bytes_for(self, slots: int, tokens: int) -> int:
        return slots * tokens * self._bytes_per_position()

    def _bytes_per_position(self) -> int:
        return 2 * self.num_layers * self.shape_tail[0] * self.shape_tail[1] * self.dtype.itemsize

    def _largest_old_tensor(self) -> int:
        return self._held // (2 * self.num_layers)

    def growth_peak_bytes(self, slots: int, tokens: int) -> int:
        """What the pool holds at the worst moment of growing to ``slots x tokens``."""
        return self.bytes_for(slots, tokens) + self._largest_old_tensor()

    def _fit(self, needed: int, wanted: int, other: int, what: str) -> int:
        """The largest size in ``[needed, wanted]`` (slots, or tokens when ``other`` is slots) whose
        growth peak fits the budget; CacheFull when even ``needed`` does not."""
        if self.max_bytes is None:
            return wanted
        room = self.max_bytes - self._largest_old_tensor()
        fits = room // (other * self._bytes_per_position()) if other else wanted
        if fits >= needed:
            return min(wanted, fits)
        slots, tokens = (needed, other) if what == "slots" else (other, needed)
        raise CacheFull(
            f"the KV cache would need {self.growth_peak_bytes(slots, tokens) / 2**20:.1f} MiB while growing "
            f"to {slots} slots x {tokens} positions (it holds {self._held / 2**20:.1f} MiB now); "
            f"the budget is {self.max_bytes / 2**20:.0f} MiB: close sessions or raise the KV cache budget"
        )

    def _zeros(self, slots: int, tokens: int) -> torch.Tensor:
        """One layer's K or V storage; the only place the pool allocates."""
        shape = (slots, self.shape_tail[0], tokens, self.shape_tail[1])
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _replace_storage(self, slots: int, tokens: int) -> None:
        """Move to ``slots x tokens`` one tensor at a time, keeping the old contents."""
        old_slots, old_tokens = min(self._slots, slots), min(self._tokens, tokens)
        for store in (self.k, self.v):
            for layer in range(self.num_layers):
                new = self._zeros(slots, tokens)
                self._held += new.numel() * new.element_size()
                self.peak_bytes = max(self.peak_bytes, self._held)
                if layer < len(store):
                    old = store[layer]
                    if old_slots and old_tokens:
                        new[:old_slots, :, :old_tokens] = old[:old_slots, :, :old_tokens]
                    self._held -= old.numel() * old.element_size()
                    store[layer] = new
                    del old
                else:
                    store.append(new)
        self._slots, self._tokens = slots, tokens

    def allocate(self) -> int:
        """Take the lowest free slot (low slots keep batches contiguous, so reads are views).

        The slot is taken only once its storage exists: a refusal leaves the pool as it was.
        """
        if self._free:
            slot = self._free[0]
        elif self._next_slot < self.max_slots:
            slot = self._next_slot
        else:
            raise CacheFull(f"all {self.max_slots} KV cache slots are in use")
        if slot >= self._slots:
            tokens = self._tokens or self._initial[1]
            wanted = min(self.max_slots, max(self._initial[0], 2 * self._slots, slot + 1))
            self._replace_storage(self._fit(slot + 1, wanted, tokens, "slots"), tokens)
        if self._free:
            heapq.heappop(self._free)
        else:
            self._next_slot += 1
        self.live += 1
        return slot

    def free(self, slot: int) -> None:
        heapq.heappush(self._free, slot)
        self.live -= 1
        if self.live == 0:  # idle: give back what grew (or everything, without keep_idle)
            self._free.clear()
            self._next_slot = 0
            if self.keep_idle:
                slots, tokens = min(self._slots, self._initial[0]), min(self._tokens, self._initial[1])
                if (slots, tokens) != (self._slots, self._tokens):
                    self._replace_storage(slots, tokens)
                return
            self.k.clear()
            self.v.clear()
            self._held = 0
            self._slots = self._tokens = 0
            self._replace_storage(0, 0)

    def reserve_tokens(self, tokens: int) -> None:
        """Make every slot able to hold ``tokens`` positions (doubling, or as much as the budget allows)."""
        if tokens > self.max_tokens:
            raise CacheFull(f"{tokens} tokens exceed the per-session limit of {self.max_tokens}")
        if tokens > self._tokens:
            wanted = self._initial[1]
            while wanted < tokens:
                wanted *= 2
            wanted = min(wanted, self.max_tokens)
            self._replace_storage(self._slots, self._fit(tokens, wanted, self._slots, "tokens"))

    def write(self, layer: int, layout: StepLayout, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new keys/values ``[N, kv_heads, D]`` at their slots and positions."""
        if layout.batch == 1:  # one row: a plain slice copy
            r = layout.rows[0]
            self.k[layer][r.slot, :, r.start : r.start + r.length] = k.transpose(0, 1)
            self.v[layer][r.slot, :, r.start : r.start + r.length] = v.transpose(0, 1)
            return
        self.k[layer][layout.slot_of_token, :, layout.positions] = k
        self.v[layer][layout.slot_of_token, :, layout.positions] = v

    def write_block(self, layer: int, slots: list[int], start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a block of keys/values ``[len(slots), kv_heads, L, D]`` at positions ``start ..
        start + L`` of each slot (ParScale's trained prefix, written once per request)."""
        index = torch.tensor(slots, device=self.device)
        end = start + k.shape[2]
        self.k[layer][index, :, start:end] = k.to(self.dtype)
        self.v[layer][index, :, start:end] = v.to(self.dtype)

    def read(self, layer: int, layout: StepLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``[B, kv_heads, key_len, D]`` of the step's rows (a view when slots are contiguous)."""
        n = layout.key_len
        if layout.slot_range is not None:
            return self.k[layer][layout.slot_range, :, :n], self.v[layer][layout.slot_range, :, :n]
        k = self.k[layer][:, :, :n].index_select(0, layout.slots)
        v = self.v[layer][:, :, :n].index_select(0, layout.slots)
        return k, v
