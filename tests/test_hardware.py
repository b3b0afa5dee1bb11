"""Hardware is a frozen control: runs whose recorded hardware differs (a cluster placed them on
different GPU types) have their speed and memory left uncompared, in the Systems addendum and in
the hypothesis checks, while the loss verdicts stand."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmlab.analysis.summary import load_experiment, summarize_arms
from lmlab.analysis.systems import systems_addendum
from lmlab.analysis.verdict import judge_experiment
from lmlab.execute.experiment import open_experiment
from lmlab.execute.ray_backend import placement
from lmlab.execute.slurm_backend import slurm_parameters
from lmlab.report.sections.addendum import conclusions, conditions
from lmlab.spec.expand import load_plan
from lmlab.store import Store
from lmlab.train.loop import train
from test_spec import base_spec

A100 = {"gpu_names": ["NVIDIA A100-SXM4-80GB"], "device": "cuda:0"}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import ARTICLES

    spec = base_spec({"dataset": "local", "path": str(ARTICLES),
                      "name": "wikitext-2-test-articles"})
    spec["preflight"]["enabled"] = False
    spec["hypothesis"]["checks"].append(
        {"metric": "tokens_per_s", "arm": "fast", "op": ">", "than": "slow"})
    tmp = tmp_path_factory.mktemp("hw")
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp / "exp"
    plan = load_plan(tmp / "spec.yaml")
    open_experiment(plan, out)
    with Store.open(out) as store:  # in this process: the runs' records are what matters here
        for r in plan.runs:
            train(r.config, r.run_id, store, out / "runs" / r.run_id)
    return out


def test_one_hardware_compares_speed(experiment: Path) -> None:
    exp = load_experiment(experiment)
    add = systems_addendum(exp)
    assert add.conditions["same_hardware"].ok
    assert add.comparisons["fast"].speed_change_pct is not None
    speed = judge_experiment(exp, summarize_arms(exp)).checks[1]
    assert speed.test != "not comparable", speed


def test_runs_on_different_hardware_are_not_compared_for_speed_or_memory(
        experiment: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "mixed"
    shutil.copytree(experiment, out)
    with Store.open(out) as store:
        for run in store.runs(arm="fast"):  # as if the cluster had put this arm on A100s
            store.set_provenance(run["run_id"], run["provenance"] | A100)
    exp = load_experiment(out)
    add = systems_addendum(exp)
    same = add.conditions["same_hardware"]
    assert not same.ok and len(same.detail["hardware"]) == 2
    assert any("A100" in h for h in same.detail["hardware"])
    c = add.comparisons["fast"]
    assert c.speed_change_pct is None and c.memory_saved_bytes is None
    assert c.final_val_loss_diff is not None  # the loss still compares
    assert "NO:" in next(i.value for i in conditions(add) if i.label == "Same hardware")
    texts = {x.label: x.lines for x in conclusions(add)}
    assert all("different hardware" in line for label, lines in texts.items()
               if "emory" in label or "peed" in label for line in lines), texts

    verdict = judge_experiment(exp, summarize_arms(exp))
    loss, speed = verdict.checks
    assert speed.verdict == "inconclusive" and speed.test == "not comparable"
    assert "different hardware" in speed.reason
    before = judge_experiment(load_experiment(experiment),
                              summarize_arms(load_experiment(experiment))).checks[0]
    assert (loss.verdict, loss.p) == (before.verdict, before.p)  # the loss verdict stands


def test_placement_honours_the_hardware_control() -> None:
    assert placement(1, None, "H100") == {"num_cpus": 1, "num_gpus": 1,
                                         "accelerator_type": "H100"}
    assert placement(2, None, "cpu") == {"num_cpus": 2, "num_gpus": 0}
    assert placement(4, 2, "cuda") == {"num_cpus": 4, "num_gpus": 2}
    params = slurm_parameters({"partition": "gpu", "time_min": 30}, cpus=4, gpus=None,
                              hardware="a100")
    assert params["slurm_constraint"] == "a100" and params["gpus_per_node"] == 1
    assert params["slurm_partition"] == "gpu" and params["timeout_min"] == 30
    gres = slurm_parameters({"gres_type": "a100"}, cpus=1, gpus=2, hardware="a100")
    assert gres["slurm_gres"] == "gpu:a100:2" and "slurm_constraint" not in gres
