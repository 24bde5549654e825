"""params.yaml validation: the repo's file loads; every mistake is one line naming the key and the value."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dsink.errors import DsinkError
from dsink.params import NOISE_TYPES, Params, from_dict, load_params, to_dict
from dsink.precision import Precision, resolve_precision
from dsink.runtime import Runtime


def load_error(tmp_path, write_params, overrides) -> str:
    path = write_params(tmp_path, overrides)
    with pytest.raises(DsinkError) as exc:
        load_params(path)
    msg = str(exc.value)
    assert "\n" not in msg, f"error spans several lines: {msg!r}"
    assert msg.startswith("params.yaml:"), msg
    return msg


def _assert_matches(raw, loaded, path=""):
    """Every key written in the YAML comes back with the same value (ints may become floats)."""
    assert isinstance(loaded, dict), path
    for key, value in raw.items():
        where = f"{path}.{key}" if path else key
        assert key in loaded, where
        if isinstance(value, dict):
            _assert_matches(value, loaded[key], where)
        else:
            assert loaded[key] == value, where
            assert type(loaded[key]) is type(value) or (type(value), type(loaded[key])) == (int, float), where


def test_repo_params_yaml_loads_with_every_value(repo_root):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    params = load_params(repo_root / "params.yaml")
    assert isinstance(params, Params)
    _assert_matches(raw, to_dict(params))


def test_overrides_reach_the_dataclasses(tmp_path, write_params):
    path = write_params(
        tmp_path,
        {
            "data.noise.rate": 0.2,
            "data.imbalance.ratio": 10,
            "seed": 7,
            "teachers.noise.forget_rate": None,
            "distill.sinkhorn.reg": 0.5,
            "data.noise.type": "file",
            "data.noise.file": "labels.npy",
        },
    )
    p = load_params(path)
    assert (p.data.noise.rate, p.data.imbalance.ratio, p.seed) == (0.2, 10.0, 7)
    assert p.teachers.noise.forget_rate is None
    assert p.distill.sinkhorn.reg == 0.5
    assert p.data.noise.file == "labels.npy"


def test_loaded_precision_switches_reach_the_engine(tmp_path, write_params):
    """`auto` (a YAML string) and the booleans survive validation and become the engine's plain bools."""
    path = write_params(
        tmp_path,
        {"teachers.noise.bf16": "auto", "teachers.noise.channels_last": "auto", "distill.bf16": True},
    )
    assert (
        "bf16: auto" in path.read_text()
    )  # unquoted, as `dvc exp run -S teachers.noise.bf16=auto` writes it
    p = load_params(path)
    rt = Runtime(torch.device("cpu"))
    timed = {Precision(a, b): 1.0 for a in (False, True) for b in (False, True)}
    timed[Precision(False, True)] = 0.5

    def no_timing():
        raise AssertionError("nothing is auto here")

    assert resolve_precision(p.teachers.noise, rt, lambda: timed.__getitem__) == Precision(False, True)
    assert resolve_precision(p.distill, rt, no_timing) == Precision(True, False)
    assert resolve_precision(p.teachers.imbalance, rt, no_timing) == Precision(False, False)


def test_missing_sections_take_the_defaults(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 3\n")
    p = load_params(tmp_path / "params.yaml")
    assert p.seed == 3
    assert to_dict(p.data) == to_dict(Params().data)


@pytest.mark.parametrize(
    "dotted, suggestion",
    [
        ("data.noise.rat", "'data.noise.rate'"),
        ("distil", "'distill'"),
        ("teachers.noise.epoch", "'teachers.noise.epochs'"),
        ("data.imbalance.profil", "'data.imbalance.profile'"),
        ("distill.sinkhorn.regg", "'distill.sinkhorn.reg'"),
        ("train.epoch", "'train.epochs'"),
        ("trian", "'train'"),
    ],
)
def test_unknown_key_names_the_closest_valid_key(tmp_path, write_params, dotted, suggestion):
    msg = load_error(tmp_path, write_params, {dotted: 1})
    assert f"unknown key {dotted!r}" in msg
    assert f"did you mean {suggestion}" in msg


def test_unknown_key_without_a_close_match_lists_the_valid_keys(tmp_path, write_params):
    msg = load_error(tmp_path, write_params, {"data.noise.zzzzzz": 1})
    assert "'data.noise.zzzzzz'" in msg
    assert "did you mean" not in msg
    for key in ("type", "rate", "include_true", "file", "key"):
        assert key in msg


@pytest.mark.parametrize(
    "dotted, value, shown, expected",
    [
        ("data.noise.rate", "0.4", "'0.4'", "a number"),  # string for a float
        ("data.imbalance.ratio", "high", "'high'", "a number"),
        ("teachers.noise.epochs", 2.5, "2.5", "an integer"),  # float for an int
        ("train.epochs", 2.5, "2.5", "an integer"),  # the shared section names itself
        ("train.bf16", "atuo", "'atuo'", "true, false or 'auto' (did you mean 'auto'?)"),
        ("distill.epochs", True, "true", "an integer"),  # bool for an int
        ("seed", "0", "'0'", "an integer"),
        ("seed", None, "null", "not null"),  # null for a non-optional int
        ("data.imbalance.ratio", None, "null", "not null"),
        ("data.noise.type", None, "null", "not null"),
        ("data.download", "yes", "'yes'", "true or false"),
        ("data.noise.include_true", 1, "1", "true or false"),
        ("distill.bf16", "atuo", "'atuo'", "true, false or 'auto' (did you mean 'auto'?)"),
        ("distill.channels_last", "True", "'True'", "true, false or 'auto' (did you mean true?)"),
        ("teachers.noise.bf16", 1, "1", "true, false or 'auto'"),
        ("teachers.noise.bf16", None, "null", "true, false or 'auto', not null"),
        ("data.dataset", 3, "3", "a string"),
        ("teachers.imbalance.milestones", "10", "'10'", "a list"),
        ("data.noise.rate", float("nan"), ".nan", "a finite number"),
        ("data.noise.rate", float("inf"), ".inf", "a finite number"),
    ],
)
def test_wrong_type_names_key_and_value(tmp_path, write_params, dotted, value, shown, expected):
    msg = load_error(tmp_path, write_params, {dotted: value})
    assert f"{dotted} = {shown} is invalid" in msg
    assert expected in msg


def test_a_section_that_is_not_a_mapping(tmp_path, write_params):
    msg = load_error(tmp_path, write_params, {"data.noise": 0.4})
    assert "data.noise = 0.4" in msg
    assert "mapping" in msg


@pytest.mark.parametrize(
    "dotted, value, shown, bound",
    [
        ("data.noise.rate", 1.0, "1.0", "< 1.0"),
        ("data.noise.rate", -0.1, "-0.1", ">= 0.0"),
        ("data.imbalance.ratio", 0.5, "0.5", ">= 1.0"),
        ("teachers.noise.epochs", 0, "0", ">= 1"),
        ("teachers.imbalance.epochs", -3, "-3", ">= 1"),
        ("distill.sinkhorn.reg", 0, "0.0", "> 0.0"),
        ("distill.lr", -0.1, "-0.1", "> 0.0"),
        ("train.lr", 0, "0.0", "> 0.0"),
        ("train.momentum", 1, "1.0", "< 1.0"),
        ("teachers.noise.q", 1.5, "1.5", "<= 1.0"),
        ("seed", -1, "-1", ">= 0"),
    ],
)
def test_out_of_range_names_key_value_and_bound(tmp_path, write_params, dotted, value, shown, bound):
    msg = load_error(tmp_path, write_params, {dotted: value})
    assert f"{dotted} = {shown} is invalid" in msg
    assert bound in msg


def test_unknown_choice_lists_the_valid_choices(tmp_path, write_params):
    msg = load_error(tmp_path, write_params, {"data.noise.type": "gaussian"})
    assert "data.noise.type = 'gaussian'" in msg
    for choice in NOISE_TYPES:
        assert choice in msg


@pytest.mark.parametrize(
    "dotted, value, hint",
    [
        ("data.noise.type", "symetric", "symmetric"),
        ("data.dataset", "fashion-mnist", "fashion_mnist"),
        ("teachers.imbalance.method", "logit_adjust", "logit_adjustment"),
    ],
)
def test_close_choice_is_suggested(tmp_path, write_params, dotted, value, hint):
    msg = load_error(tmp_path, write_params, {dotted: value})
    assert f"{dotted} = {value!r}" in msg
    assert f"did you mean {hint!r}" in msg


def test_noise_type_file_without_a_file(tmp_path, write_params):
    msg = load_error(tmp_path, write_params, {"data.noise.type": "file", "data.noise.file": None})
    assert "data.noise.file = null" in msg
    assert "file" in msg.split("expected", 1)[1]


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"evaluate.few_threshold": 200, "evaluate.many_threshold": 100}, "evaluate.few_threshold = 200"),
        ({"distill.warmup_epochs": 30, "distill.epochs": 30}, "distill.warmup_epochs = 30"),
        ({"teachers.noise.schedule": "step", "teachers.noise.milestones": []}, "teachers.noise.milestones"),
        ({"teachers.noise.milestones": [5, "x"]}, "teachers.noise.milestones = [5, x]"),
        # a value inherited from `train` is named where it is written
        (
            {"train.warmup_epochs": 20, "train.epochs": 20},
            "train.warmup_epochs = 20 is invalid: expected fewer than train.epochs",
        ),
        (
            {"train.warmup_epochs": 5, "distill.epochs": 5},
            "train.warmup_epochs = 5 is invalid: expected fewer than distill.epochs (5)",
        ),
        (
            {"teachers.noise.schedule": "step"},
            "train.milestones = [] is invalid: expected at least one epoch "
            "when teachers.noise.schedule is 'step'",
        ),
        ({"train.milestones": [5, "x"]}, "train.milestones = [5, x]"),
    ],
)
def test_cross_field_checks(tmp_path, write_params, overrides, key):
    assert key in load_error(tmp_path, write_params, overrides)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(DsinkError, match="cannot read params file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 0\ndata: [unclosed\n")
    with pytest.raises(DsinkError, match=r"not valid YAML at line \d"):
        load_params(bad)


@settings(max_examples=40, deadline=None)
@given(rate=st.floats(min_value=-2.0, max_value=2.0, allow_nan=False))
def test_rate_accepted_exactly_in_zero_one(rate):
    raw = {"data": {"noise": {"rate": rate}}}
    if 0.0 <= rate < 1.0:
        assert from_dict(Params, raw).data.noise.rate == rate
    else:
        with pytest.raises(DsinkError, match=r"data\.noise\.rate = "):
            from_dict(Params, raw)


@settings(max_examples=40, deadline=None)
@given(ratio=st.one_of(st.integers(-5, 1000), st.floats(0.0, 1e6, allow_nan=False)))
def test_ratio_accepted_iff_at_least_one(ratio):
    raw = {"data": {"imbalance": {"ratio": ratio}}}
    if ratio >= 1:
        got = from_dict(Params, raw).data.imbalance.ratio
        assert isinstance(got, float) and math.isclose(got, ratio)
    else:
        with pytest.raises(DsinkError, match=r"data\.imbalance\.ratio = .* >= 1"):
            from_dict(Params, raw)


TRAINED = ("teachers.imbalance", "teachers.noise", "baselines.ce", "baselines.la_small_loss", "distill")


def _section(p: Params, dotted: str):
    for part in dotted.split("."):
        p = getattr(p, part)
    return p


def test_every_model_inherits_the_shared_train_section(tmp_path, write_params):
    p = load_params(
        write_params(tmp_path, {"train.epochs": 7, "train.model": "mlp", "train.milestones": [3]})
    )
    assert (p.train.epochs, p.train.model, p.train.milestones) == (7, "mlp", [3])
    for name in TRAINED:
        tp = _section(p, name)
        assert (tp.epochs, tp.model, tp.milestones) == (7, "mlp", [3]), name
    # each model holds its own copy: a consumer that edits one list does not edit another model's
    assert len({id(_section(p, name).milestones) for name in TRAINED} | {id(p.train.milestones)}) == 6


@pytest.mark.parametrize("name", TRAINED)
def test_a_section_override_wins_for_that_model_only(tmp_path, write_params, name):
    p = load_params(write_params(tmp_path, {"train.epochs": 7, f"{name}.epochs": 3, f"{name}.augment": True}))
    for other in TRAINED:
        tp = _section(p, other)
        want = (3, True) if other == name else (7, p.train.augment)
        assert (tp.epochs, tp.augment) == want, other
    assert p.train.epochs == 7


def test_an_empty_or_missing_section_takes_every_training_key_from_train(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 4\nbaselines:\n  ce: {}\n  la_small_loss:\n")
    p = load_params(path)
    assert [_section(p, name).epochs for name in TRAINED] == [4] * 5
    # with no `train` either, every model has the schema's defaults
    path.write_text("seed: 1\n")
    q = load_params(path)
    for name in TRAINED:
        shared = {k: v for k, v in to_dict(_section(q, name)).items() if k in to_dict(q.train)}
        assert shared == to_dict(Params().train), name


def test_checkpoint_keys_change_for_exactly_the_models_whose_effective_values_change(tmp_path, write_params):
    """Runs key their checkpoints on the section's resolved values (``dsink.runs.stage_config``): moving a
    value between `train` and a section changes no key; a changed value changes the keys of the models
    that see it, and only those."""
    from dsink.runs import stage_config

    def keys(overrides):
        p = load_params(write_params(tmp_path / str(len(list(tmp_path.iterdir()))), overrides))
        return {name: stage_config(p, "seed", "data", name) for name in TRAINED}

    base = keys({})
    assert keys({"teachers.noise.epochs": base["distill"]["distill"]["epochs"]}) == base  # a no-op override
    everyone = keys({"train.epochs": 3})
    assert all(everyone[name] != base[name] for name in TRAINED)
    one = keys({"teachers.noise.epochs": 3})
    assert {name for name in TRAINED if one[name] != base[name]} == {"teachers.noise"}
    assert one["teachers.noise"] == everyone["teachers.noise"]  # the same effective values, the same key
