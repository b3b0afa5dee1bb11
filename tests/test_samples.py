"""Text samples of each run's final model: generated after training returns (a run trains the
same with samples on or off), deterministic under the fixed decoding seed, stored with the run,
and shown per arm in the report."""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.config import RunConfig
from lmlab.data.tokenize import build_tokenizer
from lmlab.data.wikitext import locate_corpus
from lmlab.execute.local import run_single
from lmlab.names import RUNS_DIR, TRAIN_LOSS
from lmlab.report import write_report
from lmlab.store import Store, put_samples, samples
from lmlab.train.samples import final_model, sample_run, samples_of
from test_report import CLEAR_WIN, WIN_CHECK, build_experiment

PROMPTS = ["The history of the city", "In 1998 , the band"]


def _cfg(articles_data: dict, **samples_cfg) -> RunConfig:
    return RunConfig.model_validate({
        "data": articles_data, "tokenizer": {"kind": "bpe", "vocab_size": 512},
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32},
        "train": {"batch_size": 4, "seq_len": 32}, "budget": {"steps": 8},
        "evaluation": {"every_steps": 8, "max_batches": 2, "test_at_end": False,
                       "samples": {"prompts": PROMPTS, "max_new_tokens": 12, **samples_cfg}},
        "cadence": {"log_every_steps": 4, "checkpoint_every_steps": 8}})


def test_samples_are_stored_deterministic_and_leave_training_alone(tmp_path: Path,
                                                                    articles_data: dict) -> None:
    cfg = _cfg(articles_data)
    out = tmp_path / "on"
    assert run_single(cfg, out, "one-s0").status == "completed"
    with Store.existing(out) as store:
        record = samples(store, "one-s0")
        losses = [r.value for r in store.metrics("one-s0", [TRAIN_LOSS])[TRAIN_LOSS]]
        assert record is not None
        assert [s["prompt"] for s in record["samples"]] == PROMPTS
        assert all(s["tokens"] == 12 and s["continuation"] for s in record["samples"])
        assert record["settings"] == cfg.evaluation.samples.model_dump(mode="json")
        # From the same final checkpoint, the same text: the decoding seed fixes it.
        again = sample_run(cfg, "one-s0", store, out / RUNS_DIR / "one-s0")
        assert again["samples"] == record["samples"]

    run_dir = out / RUNS_DIR / "one-s0"
    tok = build_tokenizer(cfg.tokenizer, locate_corpus(cfg.data))
    model = final_model(cfg, tok.vocab_size, run_dir, torch.device("cpu"))
    reseeded = _cfg(articles_data, seed=1)
    assert samples_of(model, tok, reseeded, torch.device("cpu"))["samples"] != record["samples"]
    greedy = _cfg(articles_data, temperature=0.0)
    first = samples_of(model, tok, greedy, torch.device("cpu"))["samples"]
    ids = tok.encode(PROMPTS[0])
    with torch.no_grad():  # greedy: the first new token is the argmax after the prompt
        top = int(model(torch.tensor([ids]))[0, -1].argmax())
    assert first[0]["continuation"].startswith(tok.decode([top]))

    # Samples off: no record, and the run trains exactly as with them on.
    off = tmp_path / "off"
    assert run_single(_cfg(articles_data, prompts=[]), off, "one-s0").status == "completed"
    with Store.existing(off) as store:
        assert samples(store, "one-s0") is None
        assert [r.value for r in store.metrics("one-s0", [TRAIN_LOSS])[TRAIN_LOSS]] == losses


def test_the_report_shows_one_seed_per_arm_and_folds_the_others(tmp_path: Path) -> None:
    exp = build_experiment(tmp_path / "x", CLEAR_WIN, checks=[WIN_CHECK])
    settings = {"prompts": ["The cat"], "max_new_tokens": 4, "temperature": 0.8, "top_k": 50,
                "seed": 0}
    with Store.existing(exp) as store:
        for arm in CLEAR_WIN:
            for seed in (0, 1, 2):
                put_samples(store, f"{arm.name}-s{seed}", {"settings": settings, "samples": [
                    {"prompt": "The cat", "continuation": f" <{arm.name} seed {seed}>",
                     "tokens": 4}]})
    write_report(exp)
    md = (exp / "report.md").read_text()
    section = md[md.index("### Samples"):md.index("## 9.")]
    assert "temperature 0.8, top-k 50, decoding seed 0" in section
    for arm in CLEAR_WIN:
        assert f"**{arm.name}** (seed 0)" in section
        assert f"&lt;{arm.name} seed 0>" in section  # model text is never markup
        assert f"{arm.name} seed 1" not in section
    html = (exp / "report.html").read_text()
    assert "&lt;lr3e-3 seed 2&gt;" in html and "<lr3e-3" not in html  # escaped, all seeds
    assert html.count("<details><summary>lr1e-3, seed") == 2
