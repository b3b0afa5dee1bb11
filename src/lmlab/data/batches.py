"""Batches of (x, y) windows: a deterministic, resumable training order and full-split evaluation.

Training order is a pure function of (seed, sample index). The train stream is cut once into
non-overlapping windows of ``max_seq_len + 1`` tokens (consecutive windows share one boundary
token, so every token but the first is a target exactly once per epoch). Sample ``k`` is window
``perm_e[k % n_windows]`` of epoch ``e = k // n_windows``, with ``perm_e`` a permutation seeded by
``(seed, e)``. Hence:

- the order does not depend on the batch size: 4 micro-batches of B/4 are exactly 1 batch of B;
- resuming needs only the count of samples consumed so far;
- a shorter ``seq_len`` (sequence-length warm-up) reads a prefix of the same windows.

On a GPU the token array can live on the device (:meth:`TrainBatcher.to`): a step's batch is
then gathered there, and the host sends only the window offsets, never the tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lmlab.errors import UserError


def _to_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, L+1) token windows -> inputs (n, L) and next-token targets (n, L), int64."""
    w = torch.from_numpy(windows.astype(np.int64))
    return w[:, :-1], w[:, 1:]


class TrainBatcher:
    def __init__(self, tokens: np.ndarray, seed: int, max_seq_len: int) -> None:
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.n_windows = (len(tokens) - 1) // max_seq_len
        if self.n_windows < 1:
            raise UserError(
                f"the train split has {len(tokens)} tokens, too few for one training window of "
                f"seq_len + 1 = {max_seq_len + 1} tokens; use a shorter seq_len or a bigger corpus",
                field="train.seq_len",
            )
        self.tokens = tokens
        self.seed = seed
        self.max_seq_len = max_seq_len
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)
        self._resident: torch.Tensor | None = None  # the tokens on the device, when moved there

    def to(self, device: torch.device) -> TrainBatcher:
        """Keep the token array on ``device`` (CUDA: int64, 8 bytes a token, ~20 MB for
        WikiText-2's train split with GPT-2's BPE) and gather batches there. On CPU nothing
        changes: the memmap is already where the model is."""
        if device.type != "cpu":
            self._resident = torch.from_numpy(np.asarray(self.tokens, dtype=np.int64)).to(device)
        return self

    @property
    def tokens_per_epoch(self) -> int:
        return self.n_windows * self.max_seq_len

    def permutation(self, epoch: int) -> np.ndarray:
        """Window order of one epoch. Seeding by (seed, epoch), not by a running generator,
        makes any epoch reproducible on its own; the last one is kept since batches ask for
        the same epoch many times in a row."""
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def window_starts(self, start: int, n: int) -> np.ndarray:
        """Token offsets of samples ``start .. start + n - 1``."""
        if start < 0 or n < 0:
            raise ValueError(f"sample range must be non-negative, got start={start}, n={n}")
        starts = np.empty(n, dtype=np.int64)
        k, filled = start, 0
        while filled < n:  # one pass per epoch the range touches
            epoch, slot = divmod(k, self.n_windows)
            take = min(n - filled, self.n_windows - slot)
            starts[filled:filled + take] = self.permutation(epoch)[slot:slot + take]
            k, filled = k + take, filled + take
        return starts * self.max_seq_len

    def batch(self, start: int, n: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start .. start + n - 1`` as (x, y), each int64 of shape (n, seq_len)."""
        if not 1 <= seq_len <= self.max_seq_len:
            raise ValueError(f"seq_len={seq_len} outside 1..max_seq_len={self.max_seq_len}")
        starts = self.window_starts(start, n)
        if self._resident is not None:
            device = self._resident.device
            offsets = torch.from_numpy(starts).to(device, non_blocking=True)
            w = self._resident[offsets[:, None] + torch.arange(seq_len + 1, device=device)]
            return w[:, :-1], w[:, 1:]
        idx = starts[:, None] + np.arange(seq_len + 1)
        return _to_xy(np.asarray(self.tokens[idx]))


def iter_eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                      max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole split in order, as non-overlapping windows: every token but the first is
    predicted exactly once, so the summed loss is the split's total NLL. Full windows come in
    batches of ``batch_size`` (the last may be smaller); the shorter remainder window, if any,
    is a batch of its own. ``max_batches`` stops early (a quick estimate, not the full split)."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    n_targets = len(tokens) - 1
    n_full = max(n_targets, 0) // seq_len
    batches = 0
    for first in range(0, n_full, batch_size):
        if max_batches is not None and batches >= max_batches:
            return
        count = min(batch_size, n_full - first)
        idx = (np.arange(first, first + count) * seq_len)[:, None] + np.arange(seq_len + 1)
        yield _to_xy(np.asarray(tokens[idx]))
        batches += 1
    rest = n_targets - n_full * seq_len
    if rest > 0 and (max_batches is None or batches < max_batches):
        yield _to_xy(np.asarray(tokens[n_full * seq_len:])[None, :])
