"""Every key of the params schema, generated: a wrong type, an out-of-range value, a typo'd name.

Each case must raise one line naming the dotted key (or the closest valid key for a typo) and the value.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from dsink import params as P
from dsink.errors import DsinkError

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "params.yaml").read_text())


def leaves(cls: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaves(hints[f.name], path + ".")
        else:
            yield path, hints[f.name], f.metadata


LEAVES = list(leaves(P.Params))


def with_value(dotted: str, value):
    raw = copy.deepcopy(BASE)
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


def wrong_type_value(tp):
    base, _ = P._strip_optional(tp)
    if P.bool_or_literals(base) is not None:  # true, false or a word such as 'auto': a number is wrong
        return 3
    return {bool: "yes", int: "three", float: "a lot", str: 12, list: "1,2"}[base]


def out_of_range_value(meta):
    if "choices" in meta:
        return "no_such_choice"
    if "ge" in meta:
        return meta["ge"] - 1
    if "gt" in meta:
        return meta["gt"] - 1 if meta["gt"] >= 1 else -1.0
    if "lt" in meta:
        return meta["lt"] + 1
    if "le" in meta:
        return meta["le"] + 1
    return None


def check_one_line(raw, *needles):
    with pytest.raises(DsinkError) as err:
        P.from_dict(P.Params, raw)
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize(("dotted", "tp", "meta"), LEAVES, ids=[d for d, _, _ in LEAVES])
def test_wrong_type(dotted, tp, meta):
    value = wrong_type_value(tp)
    check_one_line(with_value(dotted, value), dotted, repr(value) if isinstance(value, str) else str(value))


RANGED = [(d, t, m) for d, t, m in LEAVES if out_of_range_value(m) is not None]


@pytest.mark.parametrize(("dotted", "tp", "meta"), RANGED, ids=[d for d, _, _ in RANGED])
def test_out_of_range(dotted, tp, meta):
    value = out_of_range_value(meta)
    base, _ = P._strip_optional(tp)
    if base is int:
        value = int(value)
    check_one_line(with_value(dotted, value), dotted, "expected")


@pytest.mark.parametrize(("dotted", "tp", "meta"), LEAVES, ids=[d for d, _, _ in LEAVES])
def test_typo_suggests_the_key(dotted, tp, meta):
    *parents, last = dotted.split(".")
    raw = copy.deepcopy(BASE)
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node.pop(last, None)
    typo = last[:-1] if len(last) > 3 else last + "x"
    node[typo] = 1
    check_one_line(raw, "unknown key", dotted)


SWITCHES = [(d, t, m) for d, t, m in LEAVES if P.bool_or_literals(P._strip_optional(t)[0]) is not None]


@pytest.mark.parametrize(("dotted", "tp", "meta"), SWITCHES, ids=[d for d, _, _ in SWITCHES])
def test_switch_accepts_its_words_and_hints_a_misspelt_one(dotted, tp, meta):
    """A ``true | false | 'auto'`` key: each accepted value comes back unchanged; a misspelt word is one
    line with the closest spelling."""
    words = P.bool_or_literals(P._strip_optional(tp)[0])
    for value in (True, False, *words):
        loaded = P.from_dict(P.Params, with_value(dotted, value))
        node = loaded
        for part in dotted.split("."):
            node = getattr(node, part)
        assert node == value and type(node) is type(value), (dotted, value, node)
    for word in words:
        typo = word[0] + word[2] + word[1] + word[3:]  # 'auto' -> 'atuo'
        check_one_line(with_value(dotted, typo), dotted, repr(typo), f"did you mean {word!r}?")


def _written(dotted: str) -> bool:
    node = BASE
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_every_key_is_in_params_yaml():
    """The shipped params.yaml spells out every key, so users see every knob: a model's training keys once,
    in the shared `train` section (which its own section may override)."""
    for dotted, _, _ in LEAVES:
        section, _, key = dotted.rpartition(".")
        if section in P.TRAINED_SECTIONS and key in P.TRAIN_KEYS:
            assert _written(dotted) or _written(f"train.{key}"), f"{dotted} missing from params.yaml"
        else:
            assert _written(dotted), f"{dotted} missing from params.yaml"
