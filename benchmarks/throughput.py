"""Training throughput of lmlab against a bare PyTorch loop at the same shapes, as ratios measured
in one run.

    python benchmarks/throughput.py [--steps 20] [--repeats 3]            # the loop
    python benchmarks/throughput.py --end-to-end [--steps 40] [--repeats 3]

Shape (issue "Core training path", section 9): 4 layers, d_model 256, 4 heads, seq 256, batch 16,
BPE vocab 8192, AdamW.

Loop mode: lmlab's loop (``lmlab.train.loop.train``, diagnostics off) and a bare loop training
the same lmlab GPT module on the same token stream, interleaved in one process; both do one
warm-up step that is not timed. It measures the loop's overhead.

End-to-end mode: ``lmlab train config.yaml`` as a user runs it (its own model, loop and default
diagnostics, in its own process) against :func:`bare_gpt`, the ~40-line GPT and AdamW loop a
researcher writes by hand (nanoGPT's shape of model: LayerNorm, fused qkv, SDPA, tanh GELU, tied
head; AdamW with torch's defaults for the implementation; clipping; ``loss.item()`` every step),
also in its own process, interleaved. Both figures are training tokens over training seconds
from the first step to the last, warm-up included (what lmlab records as a run's tokens/sec);
the bare loop's evaluations are none, lmlab's are outside its training seconds. The ratio
lmlab / bare is printed per repeat, and its median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from lmlab.config import RunConfig
from lmlab.data.tokenize import prepare_data
from lmlab.model import build_model
from lmlab.store import Store
from lmlab.train.loop import train

DATA = Path(os.environ.get("LMLAB_DATA_DIR", "../shared/data")) / "wikitext-2-test-articles"
SHAPE = {"vocab": 8192, "n_layer": 4, "n_head": 4, "d_model": 256, "seq": 256, "batch": 16}


def config(steps: int, *, diagnostics: bool = False) -> RunConfig:
    off = {"layer_grad_norms": False, "norm_grad_norms": False, "activation_norms": False,
           "attention_entropy": False, "update_ratio": False}
    return RunConfig.model_validate({
        "data": {"dataset": "local", "path": str(DATA), "name": "wikitext-2-test-articles"},
        "tokenizer": {"kind": "bpe", "vocab_size": SHAPE["vocab"]},
        "model": {"n_layer": SHAPE["n_layer"], "n_head": SHAPE["n_head"],
                  "d_model": SHAPE["d_model"]},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "train": {"batch_size": SHAPE["batch"], "seq_len": SHAPE["seq"]},
        "budget": {"steps": steps},
        "evaluation": {"every_steps": 10**9, "max_batches": 1, "test_at_end": False,
                       **({} if diagnostics else {"diagnostics": off})},
        "cadence": {"log_every_steps": 10, "checkpoint_every_steps": 10**9},
    })


# -- loop mode --------------------------------------------------------------------------------


def bare_loop(cfg: RunConfig, tokens: torch.Tensor, vocab: int, steps: int) -> float:
    """The hand-written baseline on lmlab's model: tokens/sec over ``steps`` timed steps."""
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


def loop_mode(args: argparse.Namespace) -> None:
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


# -- end-to-end mode ----------------------------------------------------------------------------


def bare_gpt(steps: int) -> dict[str, float]:
    """A researcher's own GPT and training loop, written as one would by hand."""
    import torch.nn.functional as F
    from torch import nn

    V, L, H, C, T, B = (SHAPE[k] for k in ("vocab", "n_layer", "n_head", "d_model", "seq", "batch"))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.fc, self.out = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
            return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(V, C), nn.Embedding(T, C)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.ln = nn.LayerNorm(C)
            self.head = nn.Linear(C, V, bias=False)
            self.head.weight = self.tok.weight

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            x = self.tok(idx) + self.pos(torch.arange(T))
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln(x))

    data = prepare_data(config(1).data, config(1).tokenizer)
    tokens = torch.from_numpy(data.splits["train"].astype("int64"))
    torch.manual_seed(0)
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    t0 = time.perf_counter()
    for _ in range(steps):
        ix = torch.randint(len(tokens) - T - 1, (B,))
        x = torch.stack([tokens[i:i + T] for i in ix])
        y = torch.stack([tokens[i + 1:i + T + 1] for i in ix])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": steps * B * T / seconds, "train_s": seconds}


def run_lmlab_train(steps: int, tmp: Path) -> dict[str, float]:
    cfg = config(steps, diagnostics=True).model_dump(mode="json")
    # lmlab's defaults for everything but the shape and budget (ten evaluations, diagnostics
    # every 50 steps, logging every 10, the default optimizer implementation).
    for key in ("evaluation", "cadence"):
        cfg.pop(key)
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp / "out"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmlab.cli", "train", str(path), "--out", str(out)],
                   check=True, capture_output=True)
    wall = time.perf_counter() - t0
    with Store.open(out) as store:
        s = store.run("bench-s0")["summary"]
    return {"tokens_per_s": s["tokens"] / s["train_s"], "train_s": s["train_s"], "wall_s": wall}


def run_bare(steps: int) -> dict[str, float]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--bare", "--steps", str(steps)],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"wall_s": time.perf_counter() - t0}


def end_to_end_mode(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"shape {SHAPE}, {args.steps} steps")
    ratios = []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            bare, ours = run_bare(args.steps), run_lmlab_train(args.steps, Path(tmp))
        ratios.append(ours["tokens_per_s"] / bare["tokens_per_s"])
        print(f"repeat {r}: bare {bare['tokens_per_s']:,.0f} tok/s ({bare['wall_s']:.0f} s in "
              f"all)   lmlab train {ours['tokens_per_s']:,.0f} tok/s ({ours['wall_s']:.0f} s in "
              f"all, evaluations included)   ratio {ratios[-1]:.3f}", flush=True)
    print(f"median ratio lmlab train / bare loop: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--end-to-end", action="store_true")
    ap.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)  # the baseline process
    args = ap.parse_args()
    if args.bare:
        print(json.dumps(bare_gpt(args.steps)))
    elif args.end_to_end:
        args.steps = args.steps or 40
        end_to_end_mode(args)
    else:
        args.steps = args.steps or 20
        loop_mode(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
