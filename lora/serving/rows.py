"""Which adapter each row of a batch uses, for the forwards inside `adapter_rows(model, rows)`.

    ids: (B,) int64, adapter k = the k-th name given to load_adapters, -1 = the base alone

A projection sees x of shape (B, T, in) flattened to M = B·T token rows; token row b·T + t belongs
to batch row b. The grouping by adapter (and, for graph capture, the 0/1 row masks) is computed
once per token-row count M, on the first projection that asks, and reused by every other
projection of the forward and by every decode step of a generation (T = 1 each time).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from ..errors import LoRAError

# The batched form (lora/serving/grouped.py, `batched_lora_`) pads every group to the largest; it is used
# when that computes at most this many rows per row that has an adapter.
MAX_PADDING = 1.5


class Batched(NamedTuple):
    """One batched shrink and expand over the G adapters of a batch that a module holds, each group
    padded to R token rows (`RowIndex.batched`).

    ks:       the adapters, in group order
    adapters: slice (a run k0..k0+G-1 of the stacks: views) or (G,) LongTensor (gathered)
    gather:   (G·R,) token rows of x in group order, a padding slot repeating its group's last row; None
              when that order is every row in order (x read as it is)
    rows:     (G·R,) or (n,) token rows of y the results are added to; None when every slot is row i
    slots:    (n,) the slots that are real rows (not padding); None when none is padding
    """
    ks: tuple[int, ...]
    adapters: slice | torch.Tensor
    G: int
    R: int
    gather: torch.Tensor | None
    rows: torch.Tensor | None
    slots: torch.Tensor | None


class ServingState:
    """Shared by the model and all its MultiLoRALinear layers (not a module: no state-dict entries)."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.current: RowIndex | None = None
        self._device_ids: dict = {}

    def device_ids(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`ids` (B,) copied into one persistent device tensor per (B, device), in place: a captured
        graph (HPU) that computes its masks from this tensor sees each new batch's index on replay."""
        key = (ids.numel(), device)
        buf = self._device_ids.get(key)
        if buf is None:
            buf = self._device_ids[key] = torch.empty(ids.numel(), dtype=torch.long, device=device)
        return buf.copy_(ids)


class RowIndex:
    """The per-row adapter index of one batch and its groupings, cached per token-row count."""

    def __init__(self, ids: torch.Tensor, n_adapters: int, state: ServingState | None = None):
        self.ids = ids.to("cpu", torch.long).reshape(-1)                     # (B,)
        self.state = state or ServingState([])
        bad = self.ids[(self.ids < -1) | (self.ids >= n_adapters)]
        if bad.numel():
            raise LoRAError(f"adapter index {int(bad[0])} out of range (-1 for none, or 0..{n_adapters - 1})")
        self.n = n_adapters
        self.active = bool((self.ids >= 0).any())
        self._groups: dict = {}
        self._masks: dict = {}

    def token_rows(self, M: int) -> int:
        """T, the tokens per batch row, for M token rows."""
        B = self.ids.numel()
        if M % B:
            raise LoRAError(f"a forward of {M} token rows does not split into the index's {B} batch rows")
        return M // B

    def groups(self, M: int, device: torch.device) -> list[tuple[int, torch.Tensor | slice | None]]:
        """[(k, the token rows of adapter k)]: None when k has every row, a slice when they are one
        contiguous run (views, no gather or scatter), else a LongTensor on `device`."""
        key = (M, device)
        if key not in self._groups:
            T, B = self.token_rows(M), self.ids.numel()
            out = []
            for k in sorted(set(self.ids.tolist()) - {-1}):
                batch_rows = torch.nonzero(self.ids == k).squeeze(1)         # (B_k,)
                if batch_rows.numel() == B:
                    out.append((k, None))
                elif int(batch_rows[-1] - batch_rows[0]) == batch_rows.numel() - 1:
                    out.append((k, slice(int(batch_rows[0]) * T, (int(batch_rows[-1]) + 1) * T)))
                else:
                    rows = (batch_rows[:, None] * T + torch.arange(T)).reshape(-1)   # (B_k · T,)
                    out.append((k, rows.to(device)))
            self._groups[key] = out
        return self._groups[key]

    def batched(self, M: int, device: torch.device, present: tuple[bool, ...]) -> Batched | None:
        """The batched form's plan for the adapters of this batch that a module holds (`present[k]`),
        or None where the grouped form is the better one: fewer than 2 such adapters, or padding the
        groups to one size would compute more than MAX_PADDING times their rows. Cached per (M,
        device, present): every projection with the same targets shares it."""
        key = ("batched", M, device, present)
        if key not in self._groups:
            self._groups[key] = self._batched_plan(M, device, present)
        return self._groups[key]

    def _batched_plan(self, M: int, device: torch.device, present: tuple[bool, ...]) -> Batched | None:
        T = self.token_rows(M)
        ks = [k for k in sorted(set(self.ids.tolist()) - {-1}) if present[k]]
        if len(ks) < 2:
            return None
        members = [torch.nonzero(self.ids == k).squeeze(1) for k in ks]          # batch rows per adapter
        G, R = len(ks), max(m.numel() for m in members) * T
        n_rows = sum(m.numel() for m in members) * T
        if G * R > MAX_PADDING * n_rows:
            return None
        token = [(m[:, None] * T + torch.arange(T)).reshape(-1) for m in members]          # (B_k · T,) each
        gather = torch.cat([torch.cat([t, t[-1:].expand(R - t.numel())]) for t in token])  # (G·R,)
        real = torch.cat([torch.arange(R) < t.numel() for t in token])                     # (G·R,) bool
        padded = not bool(real.all())
        rows = gather[real] if padded else gather
        slots = torch.nonzero(real).squeeze(1) if padded else None
        in_order = not padded and torch.equal(gather, torch.arange(M))
        run = ks == list(range(ks[0], ks[0] + G))
        on = lambda t: None if t is None else t.to(device)
        return Batched(tuple(ks), slice(ks[0], ks[0] + G) if run else torch.tensor(ks, device=device), G, R,
                       None if in_order else on(gather), None if in_order else on(rows), on(slots))

    def token_ids(self, M: int, device: torch.device) -> torch.Tensor:
        """(M,) int32: the adapter of each token row, -1 for none (the Triton kernels' per-row index)."""
        key = ("ids", M, device)
        if key not in self._groups:
            self._groups[key] = self.ids.repeat_interleave(self.token_rows(M)).to(device, torch.int32)
        return self._groups[key]

    def masks(self, M: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """[(M, 1) 0/1 mask of adapter k's token rows, in `dtype`, for k = 0..n-1]: device ops on the
        state's persistent index tensor, no host sync."""
        key = (M, device, dtype)
        if key not in self._masks:
            T = self.token_rows(M)
            ids = self.state.device_ids(self.ids, device).repeat_interleave(T)     # (M,)
            self._masks[key] = [(ids == k).to(dtype).unsqueeze(1) for k in range(self.n)]
        return self._masks[key]


def serving_state(model) -> ServingState:
    state = getattr(model, "serving_state", None)
    if state is None:
        raise LoRAError("the model holds no named adapters (lora.serving.load_adapters first)")
    return state


def row_index(model, rows) -> torch.Tensor:
    """(B,) int64 adapter index from a list of adapter names (None: the base alone) or ints."""
    names = serving_state(model).names
    if isinstance(rows, torch.Tensor):
        return rows.to(torch.long)
    ids = []
    for i, r in enumerate(rows):
        if r is None:
            ids.append(-1)
        elif isinstance(r, int):
            ids.append(r)
        elif r in names:
            ids.append(names.index(r))
        else:
            raise LoRAError(f"row {i + 1}: unknown adapter {r!r} (loaded: {', '.join(names)})")
    return torch.tensor(ids, dtype=torch.long)


@contextlib.contextmanager
def adapter_rows(model, rows):
    """Inside the block, batch row b of every forward uses adapter rows[b] (a name, an index, or None
    / -1 for the base alone). Outside any such block a model with named adapters computes the base."""
    state = serving_state(model)
    index = RowIndex(row_index(model, rows), len(state.names), state)
    old, state.current = state.current, index
    try:
        yield index
    finally:
        state.current = old
