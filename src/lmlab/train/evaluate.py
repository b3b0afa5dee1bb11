"""Evaluation on a whole split: loss, perplexity, bits per byte and word-level perplexity."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.data.batches import iter_eval_batches
from lmlab.data.tokenize import SplitStats
from lmlab.train.step import autocast_context


@torch.no_grad()
def evaluate(model: nn.Module, tokens: Any, stats: SplitStats, seq_len: int, batch_size: int,
             max_batches: int | None, device: torch.device, precision: str) -> dict[str, float]:
    """Loss over non-overlapping windows of the split; the full split unless max_batches caps it.

    Returns ``lmlab.names.EVAL_KEYS`` (loss, ppl, bpb, word_ppl) and the number of target tokens.
    Bits per byte and word-level perplexity (total NLL over the split's whitespace-separated
    words, as lm-evaluation-harness's wikitext task defines it) stay comparable across tokenizers.
    """
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for x, y in iter_eval_batches(tokens, seq_len, batch_size, max_batches):
        x, y = x.to(device), y.to(device)
        with autocast_context(device, precision):
            logits = model(x)
        nll += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
        n += y.numel()
    model.train(was_training)
    total = nll.item()
    loss = total / n
    # On a capped evaluation the NLL of the whole split is extrapolated from the per-token loss.
    split_nll = total if max_batches is None else loss * max(stats.n_tokens - 1, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpb": split_nll / (math.log(2) * stats.n_bytes),
        "word_ppl": math.exp(min(split_nll / stats.n_words, 700.0)),
        "tokens": float(n),
    }
