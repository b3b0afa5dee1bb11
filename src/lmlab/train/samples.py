"""Text samples from a run's final model: continuations of a few fixed prompts
(``evaluation.samples``), generated once the run has completed and stored with it.

Researchers read samples beside the loss (a lower loss that still babbles, a repetition loop,
an arm that learned the formatting); lmlab keeps them out of the training loop entirely: the
worker calls :func:`sample_run` after ``train()`` returns, and it starts from the run's final
checkpoint, so a run's curves and timings are the same with samples on or off. Decoding is
seeded (``evaluation.samples.seed``, a generator of its own, on the CPU where the draws are
made): the same final weights give the same text on every machine and every rerun.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.config import RunConfig, SamplesConfig
from lmlab.data.tokenize import Tokenizer, build_tokenizer
from lmlab.data.wikitext import locate_corpus
from lmlab.store import Store, put_samples
from lmlab.train.checkpoint import load_checkpoint
from lmlab.train.step import autocast_context, build_run_model, resolve_device


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], cfg: SamplesConfig, context: int,
             device: torch.device, precision: str = "fp32", index: int = 0) -> list[int]:
    """``cfg.max_new_tokens`` tokens after ``prompt``: temperature and top-k sampling (greedy
    at temperature 0), the context cropped to the model's last ``context`` positions. Prompt
    ``index`` draws from its own stream of the seed, so adding a prompt changes no other's."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(cfg.max_new_tokens):
        with autocast_context(device, precision):
            logits: Tensor = model(ids[:, -context:])[0, -1].float().cpu()
        if cfg.temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / cfg.temperature
            if cfg.top_k is not None and cfg.top_k < logits.numel():
                kth = torch.topk(logits, cfg.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out


def final_model(cfg: RunConfig, vocab_size: int, run_dir: Path,
                device: torch.device) -> nn.Module | None:
    """The run's final weights (the EMA's when the run keeps one: what it was evaluated with),
    from its last checkpoint, in eval mode; None when there is no checkpoint."""
    ckpt = load_checkpoint(run_dir)
    if ckpt is None:
        return None
    state = ckpt["learner"]
    model = build_run_model(cfg, vocab_size)
    model.load_state_dict(state["model"])
    if state.get("ema") is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        for p, e in zip(params, state["ema"], strict=True):
            p.data.copy_(e)
    return model.to(device).eval()


def samples_of(model: nn.Module, tokenizer: Tokenizer, cfg: RunConfig,
               device: torch.device) -> dict[str, Any]:
    """The record stored for a run: its settings and one continuation per prompt."""
    sc = cfg.evaluation.samples
    context = getattr(model, "max_seq_len", cfg.train.seq_len)
    items = []
    for i, prompt in enumerate(sc.prompts):
        ids = tokenizer.encode(prompt) or [0]
        new = generate(model, ids, sc, context, device, cfg.train.precision, index=i)
        items.append({"prompt": prompt, "continuation": tokenizer.decode(new),
                      "tokens": len(new)})
    return {"settings": sc.model_dump(mode="json"), "samples": items}


def sample_run(cfg: RunConfig, run_id: str, store: Store, run_dir: Path,
               base: Path | None = None) -> dict[str, Any] | None:
    """Generate and store ``run_id``'s samples from its final checkpoint (a completed run's);
    None when samples are off or there is no checkpoint to read."""
    if not cfg.evaluation.samples.prompts:
        return None
    start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    tokenizer = build_tokenizer(cfg.tokenizer, locate_corpus(cfg.data, base), base)
    model = final_model(cfg, tokenizer.vocab_size, run_dir, device)
    if model is None:
        return None
    record = samples_of(model, tokenizer, cfg, device)
    record["seconds"] = time.perf_counter() - start
    put_samples(store, run_id, record)
    return record
