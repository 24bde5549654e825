"""Typed, validated ``params.yaml``.

Every stage reads its section through :func:`load_params`, so a typo, a wrong type or an out-of-range value
is reported once, at the edge, as one line naming the key, the value and what was expected (with the
closest valid key for typos) instead of surfacing as a crash deep in training.

The schema is a tree of dataclasses. Field metadata carries the checks (``choices``, ``ge``/``gt``/``le``/
``lt``), so the rules live next to the defaults and the loader stays generic.

Training settings (:class:`TrainParams`) are written once, in the top-level ``train`` section; each trained
model's section (:data:`TRAINED_SECTIONS`) may set any of those keys again, and its value wins for that model
only. The loader resolves this, so ``params.teachers.noise.epochs`` is always the noise teacher's effective
value and no consumer needs to know where it was written.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dsink.errors import DsinkError

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "image_folder", "synthetic")
NOISE_TYPES = ("none", "symmetric", "asymmetric", "imbalanced", "file")
IMBALANCE_METHODS = ("logit_adjustment", "balanced_softmax", "ce")
NOISE_METHODS = ("gce", "small_loss", "elr", "ce")
NOISE_RATE_MIXTURES = ("per_class", "global")  # dsink.noise_rate.MIXTURES
MODEL_NAMES = ("small_cnn", "resnet32", "preact_resnet18", "mlp")
BASELINES = ("ce", "la_small_loss")
SELECTIONS = ("global", "per_class")
BASE_RAMPS = ("constant", "linear_down", "cosine_down")
BASE_FILTERS = ("all", "agree", "soft", "noise_teacher", "noise_teacher_chance")

AUTO = "auto"
# A switch that can also be left to the machine: ``true``, ``false`` or ``"auto"`` (decided at run time).
BoolOrAuto = bool | Literal["auto"]


def _opt(default: Any, **checks: Any) -> Any:
    """A dataclass field with a default and validation metadata."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=checks)
    return field(default=default, metadata=checks)


def _sub(cls: type) -> Any:
    return field(default_factory=cls)


@dataclass
class ImbalanceParams:
    """Long-tail profile applied by clean label (see ``dsink.data.longtail``)."""

    profile: str = _opt("exp", choices=("exp", "step", "none"))
    ratio: float = _opt(100.0, ge=1.0)
    head: str = _opt("natural", choices=("natural", "permuted"))


@dataclass
class NoiseParams:
    """Label noise injected after the long tail (see ``dsink.data.noise``)."""

    type: str = _opt("symmetric", choices=NOISE_TYPES)
    rate: float = _opt(0.4, ge=0.0, lt=1.0)
    # symmetric/imbalanced: may the wrong label be the true one? false = RoLT convention (always flips).
    include_true: bool = _opt(False)
    file: str | None = _opt(None)
    key: str | None = _opt(None)


@dataclass
class SyntheticParams:
    """A tiny seeded image set for tests (never a default)."""

    num_classes: int = _opt(4, ge=2)
    image_size: int = _opt(8, ge=4)
    channels: int = _opt(1, ge=1)
    train_per_class: int = _opt(200, ge=1)
    test_per_class: int = _opt(50, ge=1)


@dataclass
class ValidationParams:
    """A validation split held out of the source training set (clean labels) before the long tail.

    ``per_class`` seeded images of every class (0: no validation split). Benchmarks choose their settings
    on it and report the test set only for the chosen one.
    """

    per_class: int = _opt(0, ge=0)


@dataclass
class DataParams:
    dataset: str = _opt("fashion_mnist", choices=DATASETS)
    root: str = _opt("data/raw")
    download: bool = _opt(False)
    image_size: int = _opt(32, ge=4)  # image_folder only: images are resized to this square size
    imbalance: ImbalanceParams = _sub(ImbalanceParams)
    noise: NoiseParams = _sub(NoiseParams)
    synthetic: SyntheticParams = _sub(SyntheticParams)
    validation: ValidationParams = _sub(ValidationParams)


@dataclass
class TrainParams:
    """What every training run (teachers, baselines and student) shares: the engine's knobs.

    In ``params.yaml`` these keys live in the shared ``train`` section; a model's own section may override
    any of them (see :func:`from_dict`).
    """

    model: str = _opt("small_cnn", choices=MODEL_NAMES)
    epochs: int = _opt(30, ge=1)
    batch_size: int = _opt(128, ge=1)
    lr: float = _opt(0.05, gt=0.0)
    momentum: float = _opt(0.9, ge=0.0, lt=1.0)
    weight_decay: float = _opt(5e-4, ge=0.0)
    schedule: str = _opt("cosine", choices=("cosine", "step", "constant"))
    milestones: list = _opt([])
    gamma: float = _opt(0.1, gt=0.0, le=1.0)
    warmup_epochs: int = _opt(0, ge=0)
    augment: bool = _opt(True)
    # bfloat16 autocast and channels-last layout: true, false (exact fp32, the default) or "auto" (the
    # engine times a few steps of this model and batch each way before training and keeps the faster)
    bf16: BoolOrAuto = _opt(False)
    channels_last: BoolOrAuto = _opt(False)
    track_every: int = _opt(1, ge=0)  # epochs between test top-1 / label-repair measurements (0: never)


@dataclass
class TeacherParams(TrainParams):
    """What both teachers share besides the engine's knobs: how their training-set logits are made.

    ``folds: 1``: one model trained on every sample predicts those same samples (in-sample logits, which
    approach the noisy one-hot labels once the model memorises). ``folds: k >= 2``: k-fold cross-fitting,
    each training sample's logits come from the model that did not train on it; validation and test
    logits are the fold models' average (``dsink.cross_fit``).
    """

    folds: int = _opt(1, ge=1)


@dataclass
class SmallLossParams:
    """Small-loss selection (keep the samples the model fits best), shared by the noise teacher and the
    one-model baseline ``la_small_loss``."""

    # the share to forget; null = estimated from the noisy data (dsink.noise_rate)
    forget_rate: float | None = _opt(None, ge=0.0, lt=1.0)
    ramp_epochs: int = _opt(10, ge=0)
    # forget_rate null: epochs of plain CE (every sample kept) before the estimate, and how it is fitted
    estimate_epochs: int = _opt(2, ge=1)
    estimate_mixture: str = _opt("per_class", choices=NOISE_RATE_MIXTURES)
    # global: one keep-rate over the batch; per_class: each given-label class keeps its own share (its
    # own estimated rate when forget_rate is null), so a tail class is not dropped wholesale
    selection: str = _opt("per_class", choices=SELECTIONS)


@dataclass
class ImbalanceTeacherParams(TeacherParams):
    method: str = _opt("logit_adjustment", choices=IMBALANCE_METHODS)
    tau: float = _opt(1.0, ge=0.0)


@dataclass
class NoiseTeacherParams(TeacherParams, SmallLossParams):
    method: str = _opt("gce", choices=NOISE_METHODS)
    q: float = _opt(0.7, gt=0.0, le=1.0)
    elr_beta: float = _opt(0.7, ge=0.0, lt=1.0)
    elr_lambda: float = _opt(3.0, ge=0.0)


@dataclass
class TeachersParams:
    imbalance: ImbalanceTeacherParams = _sub(ImbalanceTeacherParams)
    noise: NoiseTeacherParams = _sub(NoiseTeacherParams)


@dataclass
class CEBaselineParams(TrainParams):
    """Plain cross-entropy on the noisy long-tailed labels: the floor every method must beat."""


@dataclass
class LASmallLossBaselineParams(TrainParams, SmallLossParams):
    """One model for both problems, as strong as a user would build it: logit-adjusted CE (tail-aware)
    trained on the samples class-aware small-loss selection keeps (noise-robust)."""

    tau: float = _opt(1.0, ge=0.0)


@dataclass
class BaselinesParams:
    """Comparison models trained on the same data and evaluated beside D-SINK (``train_baseline@*``)."""

    ce: CEBaselineParams = _sub(CEBaselineParams)
    la_small_loss: LASmallLossBaselineParams = _sub(LASmallLossBaselineParams)


@dataclass
class SinkhornParams:
    reg: float = _opt(2.0, gt=0.0)
    max_iter: int = _opt(200, ge=1)
    tol: float = _opt(1e-4, gt=0.0)
    temperature: float = _opt(1.0, gt=0.0)


@dataclass
class DistillParams(TrainParams):
    alpha: float = _opt(1.0, ge=0.0)
    alpha_warmup_epochs: int = _opt(0, ge=0)
    base_loss: str = _opt("logit_adjusted", choices=("ce", "logit_adjusted", "none"))
    # the base loss's weight: base_weight at epoch 0, then constant or ramped down to 0 over
    # base_ramp_epochs (0: over the whole run, ``epochs``); the defaults are the original full weight
    base_weight: float = _opt(1.0, ge=0.0)
    base_ramp: str = _opt("constant", choices=BASE_RAMPS)
    base_ramp_epochs: int = _opt(0, ge=0)
    # which samples the base loss is applied to: all; agree = given label == argmax q (the transport
    # plan's verdict); soft = each sample weighted by q_i[given label]; noise_teacher = the samples the noise
    # teacher's own losses select as clean, per class (dsink.distill.noise_teacher_selection). Always
    # normalised by the batch size.
    base_filter: str = _opt("all", choices=BASE_FILTERS)
    tau: float = _opt(1.0, ge=0.0)  # student's logit adjustment: raw logits + tau*log(prior) = train space
    scope: str = _opt("dataset", choices=("batch", "dataset"))
    resolve_every: int = _opt(1, ge=1)  # dataset scope: epochs between re-solves
    class_totals: str = _opt("hard", choices=("soft", "hard"))
    # w: the per-sample evidence in the cost is the geometric mixture f_N^(1-w) f_L^w (0: f_N alone, the
    # paper); f_L then also speaks per sample, which helps once f_N's in-sample logits carry memorised labels
    cost_imbalance_weight: float = _opt(0.0, ge=0.0, le=1.0)
    # w_r: the class totals are read from f_N^(1-w_r) f_L^w_r (1: f_L alone, the paper). Below 1 the noise
    # teacher's per-sample view corrects a class histogram f_L gets wrong (e.g. a tail it under-predicts)
    class_totals_imbalance_weight: float = _opt(1.0, ge=0.0, le=1.0)
    # the student's training prior: its raw logits + tau*log(prior) are trained against q (train space)
    prior: str = _opt("imbalance_teacher", choices=("imbalance_teacher", "noisy_labels"))
    # how to read the imbalance teacher's raw logits for the class totals: auto = its metadata
    # ``train_offset`` (none: train space). The noise teacher is always read by its metadata: in the cost
    # a per-class offset is absorbed by the class scaling; it matters only in the totals, when w_r < 1.
    imbalance_space: str = _opt("auto", choices=("auto", "train", "balanced"))
    chunk_size: int = _opt(65536, ge=1)
    sinkhorn: SinkhornParams = _sub(SinkhornParams)


@dataclass
class EvaluateParams:
    many_threshold: int = _opt(100, ge=0)
    few_threshold: int = _opt(20, ge=0)
    batch_size: int = _opt(512, ge=1)


@dataclass
class DumpParams:
    batch_size: int = _opt(512, ge=1)


@dataclass
class Params:
    seed: int = _opt(0, ge=0)
    data: DataParams = _sub(DataParams)
    # the training settings every model inherits; the sections below hold the effective (resolved) values
    train: TrainParams = _sub(TrainParams)
    teachers: TeachersParams = _sub(TeachersParams)
    dump: DumpParams = _sub(DumpParams)
    baselines: BaselinesParams = _sub(BaselinesParams)
    distill: DistillParams = _sub(DistillParams)
    evaluate: EvaluateParams = _sub(EvaluateParams)


# The sections that train a model: each inherits ``train`` and may override any of its keys.
TRAINED_SECTIONS = (
    "teachers.imbalance",
    "teachers.noise",
    "baselines.ce",
    "baselines.la_small_loss",
    "distill",
)
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainParams))


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    # A bare scalar dumps as "2.5\n...": drop YAML's document-end marker and keep the message on one line.
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return " ".join(text.removesuffix("...").split())


def _bad(path: str, value: Any, expected: str) -> DsinkError:
    return DsinkError(f"params.yaml: {path} = {_fmt(value)} is invalid: expected {expected}")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def bool_or_literals(tp: Any) -> tuple[str, ...] | None:
    """The strings a ``bool | Literal[...]`` annotation (e.g. ``BoolOrAuto``) accepts besides a bool."""
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return None
    args = typing.get_args(tp)
    literals = [a for a in args if typing.get_origin(a) is Literal]
    if bool not in args or len(literals) + 1 != len(args):
        return None
    return tuple(v for lit in literals for v in typing.get_args(lit))


def _coerce_bool_or(path: str, value: Any, words: tuple[str, ...]) -> Any:
    if isinstance(value, bool) or value in words:
        return value
    expected = "true, false or " + " or ".join(repr(w) for w in words)
    if isinstance(value, str):
        # a quoted 'True' or a misspelt 'auto': point at the spelling that works
        spellings = {"true": "true", "false": "false", **{w: repr(w) for w in words}}
        close = difflib.get_close_matches(value.lower(), list(spellings), n=1)
        if close:
            expected += f" (did you mean {spellings[close[0]]}?)"
    raise _bad(path, value, expected)


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotated type; ints are accepted where floats are expected."""
    base, optional = _strip_optional(tp)
    words = bool_or_literals(base)
    if value is None:
        if optional:
            return None
        what = (
            "true, false or " + " or ".join(map(repr, words))
            if words
            else f"a {getattr(base, '__name__', base)}"
        )
        raise _bad(path, value, f"{what}, not null")
    if words is not None:
        return _coerce_bool_or(path, value, words)
    if base is bool:
        if not isinstance(value, bool):
            raise _bad(path, value, "true or false")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(path, value, "an integer")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(path, value, "a number")
        value = float(value)
        if not math.isfinite(value):
            raise _bad(path, value, "a finite number")
        return value
    if base is str:
        if not isinstance(value, str):
            raise _bad(path, value, "a string")
        return value
    if base is list:
        if not isinstance(value, list):
            raise _bad(path, value, "a list")
        return value
    raise TypeError(f"unsupported params type {tp!r} at {path}")


def _check_range(path: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), meta["choices"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _bad(path, value, "one of " + ", ".join(meta["choices"]) + hint)
    bounds = []
    ok = True
    for key, sym, test in (
        ("ge", ">=", lambda v, b: v >= b),
        ("gt", ">", lambda v, b: v > b),
        ("le", "<=", lambda v, b: v <= b),
        ("lt", "<", lambda v, b: v < b),
    ):
        if key in meta:
            bounds.append(f"{sym} {meta[key]}")
            ok = ok and test(value, meta[key])
    if not ok:
        raise _bad(path, value, "a value " + " and ".join(bounds))


def from_dict(cls: type, raw: Any, path: str = "", train: TrainParams | None = None) -> Any:
    """Build dataclass ``cls`` from a YAML mapping, rejecting unknown keys with the closest valid one.

    For :class:`Params`, the ``train`` section is built first and handed down: a training section (a
    :class:`TrainParams` subclass) takes every training key it does not set from it.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _bad(path or "<top level>", raw, "a mapping of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {(path + '.' if path else '') + close[0]!r}?" if close else ""
            raise DsinkError(
                f"params.yaml: unknown key {where!r}{hint} (valid here: {', '.join(sorted(fields))})"
            )
    if cls is Params:
        train = from_dict(TrainParams, raw.get("train"), "train")
    inherits = train is not None and issubclass(cls, TrainParams) and cls is not TrainParams
    kwargs = {}
    for name, f in fields.items():
        if cls is Params and name == "train":
            kwargs[name] = train
            continue
        sub_path = f"{path}.{name}" if path else name
        tp = hints[name]
        if name not in raw:
            if inherits and name in TRAIN_KEYS:
                kwargs[name] = copy.deepcopy(getattr(train, name))
            elif train is not None and dataclasses.is_dataclass(tp):  # an absent section inherits too
                kwargs[name] = from_dict(tp, None, sub_path, train)
            continue
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, raw[name], sub_path, train)
        else:
            value = _coerce(sub_path, raw[name], tp)
            _check_range(sub_path, value, f.metadata)
            kwargs[name] = value
    params = cls(**kwargs)
    if cls is Params:
        _check_cross_field(params, raw)
    return params


def _written_at(raw: Any, section: str) -> typing.Callable[[str], str]:
    """``key -> dotted path`` of where the YAML wrote a training key's effective value for ``section``:
    the section itself when it overrides the key, else ``train``."""
    for part in section.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None
    written = raw if isinstance(raw, dict) else {}
    return lambda key: f"{section}.{key}" if key in written else f"train.{key}"


def _check_cross_field(p: Params, raw: dict) -> None:
    noise = p.data.noise
    if noise.type == "file" and not noise.file:
        raise _bad("data.noise.file", noise.file, "a path to a label file when data.noise.type is 'file'")
    if noise.type not in ("none", "file") and noise.rate == 0.0:
        pass  # a zero rate is a valid, clean run
    for name in TRAINED_SECTIONS:
        train = p
        for part in name.split("."):
            train = getattr(train, part)
        key = _written_at(raw, name)
        ms = train.milestones
        if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in ms):
            raise _bad(key("milestones"), ms, "a list of non-negative integers (epochs)")
        if train.schedule == "step" and not ms:
            raise _bad(key("milestones"), ms, f"at least one epoch when {key('schedule')} is 'step'")
        if train.warmup_epochs >= train.epochs and train.warmup_epochs > 0:
            raise _bad(
                key("warmup_epochs"), train.warmup_epochs, f"fewer than {key('epochs')} ({train.epochs})"
            )
    if p.evaluate.few_threshold > p.evaluate.many_threshold:
        raise _bad(
            "evaluate.few_threshold",
            p.evaluate.few_threshold,
            f"<= evaluate.many_threshold ({p.evaluate.many_threshold})",
        )


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raise :class:`DsinkError` with one clear line on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DsinkError(f"cannot read params file {str(path)!r}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise DsinkError(f"params file {str(path)!r} is not valid YAML{where}") from exc
    return from_dict(Params, raw)


def to_dict(obj: Any) -> Any:
    """Plain-dict form of a params dataclass (for artifact metadata)."""
    return dataclasses.asdict(obj)
