"""Training throughput: lmlab's loop against a bare PyTorch loop on the same config, interleaved
in one process, reported as a ratio.

    python benchmarks/throughput.py [--steps 20] [--repeats 3]

Shape (issue "Core training path", section 9): 4 layers, d_model 256, 4 heads, seq 256, batch 16,
BPE vocab 8192, AdamW. Both loops train the same GPT module on the same token stream; the bare
loop is what a researcher writes by hand (random windows, AdamW with torch's defaults, clipping).
lmlab's figure is tokens / training seconds as it records them (evaluation excluded), with its
diagnostics off; both loops do one warm-up step that is not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmlab.config import RunConfig
from lmlab.data.tokenize import prepare_data
from lmlab.model import build_model
from lmlab.store import Store
from lmlab.train.loop import train

DATA = Path(os.environ.get("LMLAB_DATA_DIR", "../shared/data")) / "wikitext-2-test-articles"


def config(steps: int) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"dataset": "local", "path": str(DATA)},
        "tokenizer": {"kind": "bpe", "vocab_size": 8192},
        "model": {"n_layer": 4, "n_head": 4, "d_model": 256},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "train": {"batch_size": 16, "seq_len": 256},
        "budget": {"steps": steps},
        "evaluation": {"every_steps": 10**9, "max_batches": 1, "test_at_end": False,
                       "diagnostics": {"layer_grad_norms": False, "norm_grad_norms": False,
                                       "activation_norms": False, "attention_entropy": False,
                                       "update_ratio": False}},
        "cadence": {"log_every_steps": 10, "checkpoint_every_steps": 10**9},
    })


def bare_loop(cfg: RunConfig, tokens: torch.Tensor, vocab: int, steps: int) -> float:
    """The hand-written baseline: ~20 lines, tokens/sec over ``steps`` timed steps."""
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab, cfg.train.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    elapsed = 0.0
    for step in range(steps + 1):
        t0 = time.perf_counter()
        ix = torch.randint(len(tokens) - T - 1, (B,))
        x = torch.stack([tokens[i:i + T] for i in ix])
        y = torch.stack([tokens[i + 1:i + T + 1] for i in ix])
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step > 0:  # step 0 is warm-up
            elapsed += time.perf_counter() - t0
    return steps * B * T / elapsed


def lmlab_loop(cfg: RunConfig, data, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp, Store.open(Path(tmp)) as store:
        store.add_run("bench", "bench", 0, cfg.to_json(), cfg.config_hash)
        train(cfg, "bench", store, Path(tmp) / "run", data=data)
        rows = store.metrics("bench", ["train_loss"])["train_loss"]
    # Training seconds after the first (warm-up) step, as the loop recorded them.
    first, last = rows[0], rows[-1]
    return (last.tokens - first.tokens) / (last.wall_s - first.wall_s)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = config(args.steps + 1)
    data = prepare_data(cfg.data, cfg.tokenizer)
    tokens = torch.from_numpy(data.splits["train"].astype("int64"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"shape 4x256 (4 heads), seq 256, batch 16, vocab {data.tokenizer.vocab_size}")
    bare, ours = [], []
    for r in range(args.repeats):  # interleaved, so machine load hits both alike
        bare.append(bare_loop(cfg, tokens, data.tokenizer.vocab_size, args.steps))
        ours.append(lmlab_loop(cfg, data, args.steps))
        print(f"repeat {r}: bare {bare[-1]:,.0f} tok/s   lmlab {ours[-1]:,.0f} tok/s   "
              f"ratio {ours[-1] / bare[-1]:.3f}")
    ratios = [o / b for o, b in zip(ours, bare, strict=True)]
    print(f"median: bare {statistics.median(bare):,.0f} tok/s   lmlab "
          f"{statistics.median(ours):,.0f} tok/s   ratio {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
