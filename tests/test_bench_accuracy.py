"""bench/accuracy.py: what a regime overrides, the cell order, the dvclive curve reader, and the summary
(margins paired by seed against the best other method, plain CE's best epoch against its final one),
checked against sums done by hand on made-up experiment records."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "accuracy.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


def _sets(sets: list[str]) -> dict[str, str]:
    return dict(s.split("=", 1) for s in sets)


def test_memorising_regime_sets_the_backbone_and_schedule_of_every_model_and_nothing_of_the_method():
    reg = bench.REGIMES["memorising"]
    sets = _sets(
        bench.overrides(100, ("sym0.6", "symmetric", 0.6), 2, reg, "/data", extra=["distill.alpha=2"])
    )
    assert sets["seed"] == "2" and sets["data.noise.rate"] == "0.6" and sets["data.root"] == "/data"
    # the backbone and schedule of every model, once, in the shared `train` section
    assert sets["train.model"] == "mlp"
    assert sets["train.epochs"] == "60"
    assert sets["train.augment"] == "false"
    assert sets["train.track_every"] == "5"
    assert sets["++baselines.ce.track_every"] == "1"  # CE's curve: best epoch vs final (a new key: `++`)
    for sec in ("teachers.imbalance", "teachers.noise", "baselines.la_small_loss", "distill"):
        assert not any(k.startswith(sec + ".") and k.rsplit(".", 1)[1] in ("model", "epochs") for k in sets)
    assert sets["distill.alpha"] == "2"
    # the method's own settings come from params.yaml (chosen on validation), not from the regime
    assert not any(k.endswith((".folds", ".selection", ".base_loss", ".ramp_epochs")) for k in sets)


def test_overrides_applied_as_dvc_applies_them_give_every_model_the_regime(tmp_path):
    """`dvc exp run -S` (Hydra's grammar) accepts every override on the shipped params.yaml, and the
    loaded params give all five models the regime's backbone and schedule, plain CE its own curve."""
    from dvc.utils.hydra import apply_overrides

    from dsink.params import TRAINED_SECTIONS, load_params

    reg = bench.REGIMES["memorising"]
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    apply_overrides(str(path), bench.overrides(100, ("sym0.6", "symmetric", 0.6), 2, reg, "/data"))
    p = load_params(path)
    for sec in TRAINED_SECTIONS:
        tp = p
        for part in sec.split("."):
            tp = getattr(tp, part)
        got = (tp.model, tp.epochs, tp.augment, tp.bf16, tp.channels_last)
        assert got == ("mlp", 60, False, "auto", "auto"), sec
        assert tp.track_every == (reg.ce_track_every if sec == "baselines.ce" else reg.track_every), sec
    assert (p.seed, p.data.noise.rate, p.data.root) == (2, 0.6, "/data")


def test_short_regime_ramps_small_loss_over_half_the_run():
    reg = bench.REGIMES["short"]
    sets = _sets(bench.overrides(10, ("sym0.2", "symmetric", 0.2), 0, reg, "/d", epochs=8, fast=False))
    assert sets["teachers.noise.ramp_epochs"] == "4" and sets["baselines.la_small_loss.ramp_epochs"] == "4"
    assert sets["train.model"] == "small_cnn" and sets["train.epochs"] == "8"
    assert "train.bf16" not in sets and not any(k.endswith(".bf16") for k in sets)


def test_cells_run_every_setting_at_a_seed_before_the_next_seed():
    reg = bench.REGIMES["memorising"]
    cells = bench.grid([100, 10], [0, 1], [0], reg)
    names = [bench.exp_name(r, s[0], seed, "mem") for r, s, seed in cells]
    assert names[:4] == [
        "mem-r100-sym0.4-s0",
        "mem-r100-sym0.6-s0",
        "mem-r100-asym0.4-s0",
        "mem-r100-imb0.4-s0",
    ]
    assert names[4] == "mem-r100-sym0.4-s1" and names[-1] == "mem-r10-imb0.4-s0"
    assert len(names) == 4 * 2 + 4


def test_read_curve_takes_step_and_the_metric_column():
    text = "timestamp\tstep\ttest_top1\n1\t0\t0.5\n2\t1\t0.7\n3\t2\t0.6\n"
    assert bench.read_curve(text) == [(0, 0.5), (1, 0.7), (2, 0.6)]
    assert bench.read_curve("step\ttest_top1\n4\t0.25\n") == [(4, 0.25)]
    assert bench.read_curve("") == []


def _run(seed: int, top1: dict[str, float], curve: list[float]) -> dict:
    metrics = {k: {"top1": v, "few": v / 2, "val": {"top1": v - 0.01}} for k, v in top1.items()}
    metrics["ce"]["memorised"] = 0.4 + seed / 100
    return {
        "rev": f"rev{seed}",
        "metrics": metrics,
        "corrupt": {"noise_rate": 0.4},
        "label_issues": None,
        "params": {"train": {"model": "mlp", "epochs": 60}, "distill": {}},
        "ce_curve": list(enumerate(curve)),
    }


def test_summary_pairs_margins_by_seed_against_the_best_other_method():
    runs = {
        "mem-r100-sym0.4-s0": _run(
            0,
            {"ce": 0.60, "imbalance_teacher": 0.70, "noise_teacher": 0.74, "dsink": 0.80},
            [0.5, 0.72, 0.60],
        ),
        "mem-r100-sym0.4-s1": _run(
            1,
            {"ce": 0.62, "imbalance_teacher": 0.71, "noise_teacher": 0.72, "dsink": 0.71},
            [0.5, 0.70, 0.62],
        ),
    }
    (row,) = bench.summarise(runs, bench.REGIMES["memorising"].settings)
    assert row["best_single"] == "noise_teacher"  # mean 0.73 against the imbalance teacher's 0.705
    assert row["dsink_paired_margin"]["mean"] == pytest.approx(((0.80 - 0.74) + (0.71 - 0.72)) / 2)
    assert row["dsink_paired_margin"]["std"] == pytest.approx(abs(0.06 - (-0.01)) / 2**0.5)
    assert row["dsink_wins"] == 1  # seed 1: the noise teacher beats D-SINK
    assert row["dsink_margin_over_ce"]["mean"] == pytest.approx(((0.80 - 0.60) + (0.71 - 0.62)) / 2)
    assert row["ce_best_epoch_top1"]["mean"] == pytest.approx((0.72 + 0.70) / 2)
    assert row["ce_final_minus_best"]["mean"] == pytest.approx(((0.60 - 0.72) + (0.62 - 0.70)) / 2)
    assert row["methods"]["ce"]["memorised"]["mean"] == pytest.approx(0.405)
    assert row["methods"]["dsink"]["val_top1"]["mean"] == pytest.approx((0.79 + 0.70) / 2)
    text = bench.markdown([row])
    assert "+2.50 ± 4.95 (noise_teacher)" in text and "| 1/2 |" in text


def test_queue_state_reads_the_last_column_of_dvc_queue_status():
    lines = [
        "Task     Name                        Created    Status",
        "3ca0089  mem-r100-sym0.4-s0          10:54 AM   Running",
        "dbb334d  mem-r100-asym0.4-s0         10:54 AM   Queued",
        "52ccf07  mem_vnone-r100-sym0.4-s0    10:54 AM   Success",
        "Worker status: 2 active, 0 idle",
    ]
    assert [bench.queue_state(ln) for ln in lines] == [None, "Running", "Queued", "Success", None]


def test_a_distill_variant_replaces_only_the_student_and_only_where_it_ran():
    runs = {
        "mem-r100-sym0.4-s0": _run(0, {"ce": 0.60, "noise_teacher": 0.74, "dsink": 0.70}, [0.5, 0.6]),
        "mem-r100-sym0.4-s1": _run(1, {"ce": 0.62, "noise_teacher": 0.72, "dsink": 0.71}, [0.5, 0.6]),
    }
    student = {"top1": 0.79, "few": 0.5, "val": {"top1": 0.78}}
    variants = {
        "rows": [
            {"variant": "other", "cells": {"mem-r100-sym0.4-s1": {"dsink": {"top1": 0.1}}}},
            {"variant": "wr0.3", "cells": {"mem-r100-sym0.4-s0": {"val": 0.78, "dsink": student}}},
        ]
    }
    out = bench.with_variant_student(runs, variants, "wr0.3")
    assert list(out) == ["mem-r100-sym0.4-s0"]  # s1 has no student of this variant: left out
    m = out["mem-r100-sym0.4-s0"]["metrics"]
    assert (
        m["dsink"] == student and m["noise_teacher"] == runs["mem-r100-sym0.4-s0"]["metrics"]["noise_teacher"]
    )
    assert runs["mem-r100-sym0.4-s0"]["metrics"]["dsink"]["top1"] == 0.70  # the input is not changed
    (row,) = bench.summarise(out, bench.REGIMES["memorising"].settings)
    assert row["dsink_paired_margin"]["mean"] == pytest.approx(0.79 - 0.74)
    with pytest.raises(SystemExit, match="no variant 'nope'"):
        bench.with_variant_student(runs, variants, "nope")


def test_convolutional_long_regime_is_the_memorising_schedule_on_small_cnn():
    mem, cnn = bench.REGIMES["memorising"], bench.REGIMES["memorising_cnn"]
    assert cnn.model == "small_cnn" and mem.model == "mlp"
    assert (cnn.epochs, cnn.augment, cnn.ce_track_every) == (mem.epochs, mem.augment, mem.ce_track_every)
    sets = _sets(bench.overrides(100, cnn.settings[0], 0, cnn, "/d"))
    assert sets["train.model"] == "small_cnn" and sets["train.epochs"] == str(mem.epochs)
    assert bench.regime_prefix(cnn, None) != bench.regime_prefix(mem, None)


def test_grid_command_queues_runs_and_collects_in_order_and_records_its_wall_time(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "cmd_queue", lambda a: calls.append(("queue", a.regime, a.noise)))
    monkeypatch.setattr(bench, "cmd_start", lambda a: calls.append(("start", a.jobs, a.wait)))
    monkeypatch.setattr(bench, "cmd_collect", lambda a: calls.append(("collect", a.tag, a.dsink_variant)))
    wall = tmp_path / "wall.json"
    argv = ["grid", "--regime", "memorising_cnn", "--noise", "sym0.4", "--jobs", "3", "--wall-out", str(wall)]
    bench.main(argv)
    assert calls == [("queue", "memorising_cnn", ["sym0.4"]), ("start", 3, True), ("collect", None, None)]
    record = json.loads(wall.read_text())
    assert record["wall_s"] >= 0 and record["command"].endswith(" ".join(argv))


def test_collect_stores_its_records_and_a_later_collect_rebuilds_the_table_from_them(tmp_path, monkeypatch):
    first = {"mem-r100-sym0.4-s0": _run(0, {"ce": 0.60, "noise_teacher": 0.74, "dsink": 0.80}, [0.5, 0.7])}
    later = {
        "mem-r100-sym0.4-s1": _run(1, {"ce": 0.62, "noise_teacher": 0.72, "dsink": 0.71}, [0.5, 0.6]),
        "other-r100-sym0.4-s0": _run(0, {"ce": 0.1, "noise_teacher": 0.1, "dsink": 0.1}, [0.1]),
    }
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    monkeypatch.setattr(bench, "_load", lambda prefix: first)
    bench.main(["collect", "--out", str(old)])
    assert json.loads(old.read_text())["runs"]["mem-r100-sym0.4-s0"]["rev"] == "rev0"
    # the first experiment's ref is gone; the second is still in the repository
    monkeypatch.setattr(bench, "_load", lambda prefix: {k: v for k, v in later.items() if k[:4] == "mem-"})
    bench.main(["collect", "--out", str(new), "--runs-from", str(old)])
    (row,) = json.loads(new.read_text())["rows"]
    both = {**first, "mem-r100-sym0.4-s1": later["mem-r100-sym0.4-s1"]}
    (expected,) = bench.summarise(both, bench.REGIMES["memorising"].settings)
    expected.pop("ce_curves")
    assert row["seeds"] == [0, 1] and row["dsink_paired_margin"]["mean"] == pytest.approx((0.06 - 0.01) / 2)
    assert {k: v for k, v in row.items() if k != "ce_curves"} == json.loads(json.dumps(expected))
    # a repository's own experiment replaces a stored record of the same name
    monkeypatch.setattr(bench, "_load", lambda prefix: {"mem-r100-sym0.4-s0": later["mem-r100-sym0.4-s1"]})
    assert bench.runs_from([str(old)], "mem")["mem-r100-sym0.4-s0"]["rev"] == "rev0"
    bench.main(["collect", "--out", str(new), "--runs-from", str(old)])
    assert json.loads(new.read_text())["runs"]["mem-r100-sym0.4-s0"]["rev"] == "rev1"
    # a table written before records were stored is refused, not read as empty
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="no experiment records"):
        bench.runs_from([str(bare)], "mem")


def test_load_asks_dvc_only_for_the_baselines_of_the_prefix_experiments(monkeypatch):
    """`dvc exp show --json --rev <baseline>` for each commit the prefix's experiments branch from (not
    `-A`, which reads the whole history); an experiment listed there whose commit is not its finished ref
    (a queued or running one) is skipped, and no experiment of the prefix means no dvc call."""
    b1, b2, b3 = "1" * 40, "2" * 40, "3" * 40
    refs = [
        (b1, "mem-r100-sym0.4-s0", "a" * 40),
        (b2, "acc-r100-sym0.4-s0", "b" * 40),
        (b3, "mem-r100-sym0.4-s1", "c" * 40),
    ]
    monkeypatch.setattr(bench, "experiment_refs", lambda repo: refs)
    monkeypatch.setattr(bench, "git_show", lambda rev, path: None)
    calls = []

    def record(name: str, rev: str) -> dict:
        metrics = {"ce": {"top1": 0.5}, "dsink": {"top1": 0.6}}
        return {
            "name": name,
            "rev": rev,
            "data": {
                "metrics": {"metrics/evaluate.json": {"data": metrics}},
                "params": {"params.yaml": {"data": {"seed": 0}}},
            },
        }

    def fake_run(cmd, **kw):
        calls.append(cmd)
        shown = [record("mem-r100-sym0.4-s0", "a" * 40), record("mem-r100-sym0.4-s1", "d" * 40)]

        class Done:
            stdout = json.dumps([{"rev": b1, "experiments": [{"revs": shown}]}])

        return Done()

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    runs = bench._load("mem")
    assert calls == [[bench.DVC, "exp", "show", "--json", "--rev", b1, "--rev", b3]]
    assert list(runs) == ["mem-r100-sym0.4-s0"] and runs["mem-r100-sym0.4-s0"]["rev"] == "a" * 40
    calls.clear()
    assert bench._load("memcnn") == {} and calls == []


def _status(*states: str) -> str:
    head = "Task     Name                 Created    Status\n"
    return head + "".join(f"ab{i:04d}   mem-r100-x-s{i}   12:00 PM   {s}\n" for i, s in enumerate(states))


def test_waiting_restarts_workers_that_exit_while_tasks_are_queued(tmp_path, monkeypatch):
    # A scripted `dvc queue status`: two workers run, one exits with a task still queued (two polls:
    # restarted once), a worker between tasks for one poll (not restarted), then the queue drains.
    statuses = iter(
        [
            _status("Queued", "Queued", "Queued"),  # before start
            _status("Running", "Running", "Queued"),
            _status("Success", "Running", "Queued"),
            _status("Success", "Running", "Queued"),  # second short poll: restart
            _status("Success", "Running", "Running"),
            _status("Success", "Success", "Running"),  # nothing queued: a short pool is fine
            _status("Success", "Success", "Success"),
        ]
    )
    launches = []

    def fake_run(cmd, **kw):
        if cmd[1:3] == ["queue", "start"]:
            launches.append(cmd[-1])
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 0, next(statuses), "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(bench, "POLL_S", 0)
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    bench.cmd_start(argparse.Namespace(jobs=2, wait=True))
    assert launches == ["2", "2"]
    record = json.loads((tmp_path / "bench/results/queue_wall.json").read_text())
    assert (record["tasks"], record["worker_restarts"]) == (3, 1)
