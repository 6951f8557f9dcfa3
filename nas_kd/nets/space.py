"""Search spaces: YAML files of per-stage choices, and the only place that calls `suggest_*`.

A space file looks like

    name: resnet
    description: ResNet-style students
    stem: [16, 24]                  # a value, or a list of choices
    head: 0
    stages:
      - {block: [basic, bottleneck], depth: [1, 2], width: [16, 24], stride: 1,
         kernel: 3, expand: [2, 4], se: false}
      - ...

Per stage: `block` (see `arch.BLOCKS`), `depth`, `width`, `stride` (fixed per stage: 1 or 2),
`kernel`, `expand` (asked only of blocks that use it) and `se`. A field with one value is fixed
and not shown to Optuna; a list is a categorical choice named `s<i>_<field>` (`stem`, `head`).
A width (a stage's, or `stem`) may instead be a range, `{min: 8, max: 256, step: 4}`: an integer
Optuna asks for on that grid (`suggest_int`), so widths are fine enough for a search at the
budget's edge to scale any shape to its budget (`nas_kd.nas.edge`) and for the hand-made networks
scaled to a budget to be specs of the space.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch.nn as nn
import yaml

from nas_kd.core.errors import InputError
from nas_kd.nets.arch import BLOCKS, Spec, StageSpec, build, downsampled, head_module, stage_module, stem_module
from nas_kd.nets.cost import Cost, count

# in the package, so that a wheel carries them; the top-level search_spaces/ is a link to this folder
SHIPPED = Path(__file__).resolve().parent.parent / "search_spaces"

_STAGE_FIELDS = {"block": str, "depth": int, "width": int, "stride": int, "kernel": int, "expand": int, "se": bool}
_STAGE_DEFAULTS = {"stride": 1, "kernel": 3, "expand": 1, "se": False}
_TOP_FIELDS = {"name", "description", "stem", "head", "stages"}

# a shape's widths at the edge as proportions: the first stage's width against the stem's, then each
# stage's against the one before (a ResNet doubles: 2); the repair scales them all to the budget
SHAPE_STEM = 32
STAGE_RATIOS_FIRST = (0.5, 0.75, 1.0, 1.5, 2.0)
STAGE_RATIOS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)


# a network's parts as `arch.Network` builds them, each with what follows it up to the next part:
# (input channels, the part's argument, classes) -> module; the head part pools and classifies
PARTS: dict[str, Callable[[int, Any, int], nn.Module]] = {
    "stem": lambda cin, width, classes: stem_module(cin, width),
    "stage": lambda cin, stage, classes: stage_module(cin, stage),
    "head": lambda cin, width, classes: nn.Sequential(head_module(cin, width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                      nn.Linear(width or cin, classes)),
}


def part_module(kind: str, cin: int, arg: Any, num_classes: int) -> nn.Module:
    """One part of a network on an input of `cin` channels (PARTS): the stem ("stem", arg: its
    width), a stage ("stage", arg: its StageSpec) or the head ("head", arg: the head conv's width
    or 0) with pooling and the classifier."""
    return PARTS[kind](cin, arg, num_classes)


@dataclass(frozen=True)
class StageChoices:
    block: tuple[str, ...]
    depth: tuple[int, ...]
    width: tuple[int, ...]  # every width allowed (a range's whole grid)
    stride: int
    kernel: tuple[int, ...]
    expand: tuple[int, ...]
    se: tuple[bool, ...]
    width_step: int = 0  # > 0: `width` is the grid min, min + step, ..., max, asked with suggest_int


def _ask_width(trial: optuna.Trial, name: str, widths: tuple[int, ...], step: int) -> int:
    """A width of the choices: an integer on the grid when `step` (a range), else categorical."""
    if len(widths) == 1:
        return widths[0]
    if step:
        return trial.suggest_int(name, widths[0], widths[-1], step=step)
    return trial.suggest_categorical(name, list(widths))


def _on_grid(width: float, widths: tuple[int, ...], step: int) -> int:
    """The width of a range's grid nearest `width`, within the range."""
    return min(widths[-1], max(widths[0], widths[0] + round((width - widths[0]) / step) * step))


def _least_widths(widths: tuple[int, ...], step: int, cin: int) -> tuple[int, ...]:
    """The widths the cheapest spec can have at a stage fed `cin` channels: a list's every one; a
    range's least, and `cin` itself (a stage as wide as its input needs no shortcut convolution)."""
    if not step:
        return widths
    return tuple(sorted({widths[0], *((cin,) if cin in widths else ())}))


@dataclass(frozen=True)
class SearchSpace:
    name: str
    description: str
    stem: tuple[int, ...]
    head: tuple[int, ...]
    stages: tuple[StageChoices, ...]
    source: str  # the file it came from
    stem_step: int = 0  # > 0: `stem` is a range's grid (StageChoices.width_step)

    # ------------------------------------------------------------ sampling

    @property
    def ranged(self) -> bool:  # every width (the stem's, each stage's) a range: any proportions fit its grid
        return bool(self.stem_step) and all(st.width_step for st in self.stages)

    def sample(self, trial: optuna.Trial, shape: bool = False) -> Spec:
        """One spec, every choice asked of `trial` (conditional: expand only for blocks that use it).
        `shape` (at the budget's edge, whose repair scales all widths by one factor): a `ranged`
        space's widths are asked as proportions (`s<i>_ratio`, from a stem of SHAPE_STEM), so Optuna
        models a few sensible ones instead of widths drawn apart from 4 to 512 channels."""
        def pick(name: str, choices: tuple[Any, ...]) -> Any:
            return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))

        proportions, wide = shape and self.ranged, float(SHAPE_STEM)  # wide: the last width, unrounded
        stages = []
        for i, st in enumerate(self.stages):
            block = pick(f"s{i}_block", st.block)
            expand = pick(f"s{i}_expand", st.expand) if BLOCKS[block].uses_expand else 1
            depth = pick(f"s{i}_depth", st.depth)
            if proportions:
                wide *= pick(f"s{i}_ratio", STAGE_RATIOS_FIRST if i == 0 else STAGE_RATIOS)
                width = _on_grid(wide, st.width, st.width_step)
            else:
                width = _ask_width(trial, f"s{i}_width", st.width, st.width_step)
            stages.append(StageSpec(block, depth, width, st.stride, pick(f"s{i}_kernel", st.kernel), expand,
                                    pick(f"s{i}_se", st.se)))
        stem = (_on_grid(SHAPE_STEM, self.stem, self.stem_step) if proportions
                else _ask_width(trial, "stem", self.stem, self.stem_step))
        return Spec(stem, tuple(stages), pick("head", self.head))

    def width_bounds(self) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
        """(least, greatest) width of the stem and of each stage."""
        return (min(self.stem), max(self.stem)), tuple((min(st.width), max(st.width)) for st in self.stages)

    def params_of(self, spec: Spec) -> dict[str, Any]:
        """The Optuna params that make `sample` return `spec` (for `study.enqueue_trial`)."""
        if len(spec.stages) != len(self.stages):
            raise InputError(f"spec {spec} has {len(spec.stages)} stages; space {self.name!r} has {len(self.stages)}")
        params: dict[str, Any] = {}

        def put(name: str, value: Any, choices: tuple[Any, ...], step: int = 0) -> None:
            if value not in choices:
                allowed = (f"a width of {choices[0]} to {choices[-1]} in steps of {step}" if step
                           else f"choices {list(choices)}")
                raise InputError(f"spec {spec}: {name}={value!r} is not in space {self.name!r} ({allowed})")
            if len(choices) > 1:
                params[name] = value

        put("stem", spec.stem, self.stem, self.stem_step)
        put("head", spec.head, self.head)
        for i, (s, st) in enumerate(zip(spec.stages, self.stages)):
            if s.stride != st.stride:
                raise InputError(f"spec {spec}: stage {i} stride {s.stride} is fixed to {st.stride} in space {self.name!r}")
            put(f"s{i}_block", s.block, st.block)
            put(f"s{i}_depth", s.depth, st.depth)
            put(f"s{i}_width", s.width, st.width, st.width_step)
            put(f"s{i}_kernel", s.kernel, st.kernel)
            if BLOCKS[s.block].uses_expand:
                put(f"s{i}_expand", s.expand, st.expand)
            put(f"s{i}_se", s.se, st.se)
        return params

    def fingerprint(self) -> str:
        """A short hash of the space's choices (not its name, file or description): what a latency
        table is valid for, and what a study of a shipped space records besides its name."""
        def stage(st: StageChoices) -> dict[str, Any]:
            d = asdict(st)
            if not d["width_step"]:  # the hash of spaces made before ranges existed
                del d["width_step"]
            return d
        choices = {"stem": self.stem, "head": self.head, "stages": [stage(s) for s in self.stages]}
        if self.stem_step:
            choices["stem_step"] = self.stem_step
        return hashlib.sha1(json.dumps(choices, sort_keys=True).encode()).hexdigest()[:12]

    def size(self) -> int:
        """How many distinct specs the space holds."""
        n = len(self.stem) * len(self.head)
        for st in self.stages:
            per_block = sum(len(st.expand) if BLOCKS[b].uses_expand else 1 for b in st.block)
            n *= per_block * len(st.depth) * len(st.width) * len(st.kernel) * len(st.se)
        return n

    def largest(self, input_shape: tuple[int, int, int], num_classes: int) -> tuple[Spec, Cost]:
        """About the spec of most MACs, with its cost: the widest stem and head, every stage at its
        greatest depth, width and kernel with SE where allowed, and per stage, in order, the block
        and expansion that give the whole network the most MACs (greedy: exact unless a block
        choice changes what later stages cost more than it adds itself)."""
        def cost(spec: Spec) -> Cost:
            return count(build(spec, input_shape, num_classes, channels_last=False), input_shape)

        stages: list[StageSpec] = [StageSpec(st.block[0], max(st.depth), max(st.width), st.stride, max(st.kernel),
                                             max(st.expand) if BLOCKS[st.block[0]].uses_expand else 1, max(st.se))
                                   for st in self.stages]
        for i, st in enumerate(self.stages):
            options = [replace(stages[i], block=b, expand=e) for b in st.block
                       for e in (st.expand if BLOCKS[b].uses_expand else (1,))]
            scored = []
            for o in options:
                spec = Spec(max(self.stem), tuple(stages[:i] + [o] + stages[i + 1:]), max(self.head))
                scored.append((cost(spec).macs, str(spec), o))
            stages[i] = max(scored, key=lambda item: (item[0], item[1]))[2]
        best = Spec(max(self.stem), tuple(stages), max(self.head))
        return best, cost(best)

    def smallest(self, input_shape: tuple[int, int, int], num_classes: int) -> tuple[tuple[Spec, Cost], tuple[Spec, Cost]]:
        """The spec of fewest MACs and the spec of fewest params, with their costs.

        A network costs its stem plus its stages plus its head, and a stage's cost depends only on
        its own choices and on the width and size of its input (a stage as wide as its input needs
        no shortcut convolution, so neither the least stem nor the least width is always the
        cheapest). Depth, kernel and SE only ever add cost and take their least value; the stem,
        each stage's (block, expand, width) and the head are chosen exactly, by dynamic programming
        over the (width, size) entering each stage (`_least`).
        """
        @functools.cache
        def cost(kind: str, cin: int, size: tuple[int, int], arg: Any) -> Cost:
            return count(part_module(kind, cin, arg, num_classes), (cin, *size))

        out = []
        for key in ("macs", "params"):
            spec = self._least(input_shape, lambda *part, key=key: getattr(cost(*part), key), lambda a, b: a + b)
            out.append((spec, count(build(spec, input_shape, num_classes, channels_last=False), input_shape)))
        return out[0], out[1]

    def least_peak(self, input_shape: tuple[int, int, int], num_classes: int,
                   peak: Callable[[nn.Module, tuple[int, int, int]], int]) -> tuple[Spec, int]:
        """The spec of lowest peak activation memory, exactly, and that peak; `peak(module, shape)`
        counts the values alive at once in one pass of `module` on one input of `shape`
        (`latency.peak_activations`).

        Between two parts of a network (stem, stages, head) only the tensor passed on is alive, so
        a network's peak is the greatest of its parts' peaks, each counted with its input; a
        stage's depth, kernel and SE never lower it. The same dynamic programming as `smallest`,
        with max in place of sum."""
        @functools.cache
        def part(kind: str, cin: int, size: tuple[int, int], arg: Any) -> int:
            return peak(part_module(kind, cin, arg, num_classes), (cin, *size))

        spec = self._least(input_shape, part, max)
        return spec, peak(build(spec, input_shape, num_classes, channels_last=False), input_shape)

    def _least(self, input_shape: tuple[int, int, int], value: Callable[[str, int, tuple[int, int], Any], int],
               combine: Callable[[int, int], int]) -> Spec:
        """A spec whose parts' values, combined in order by `combine` (sum or max: never less
        than either), are least; of equal ones, a deterministic one. `value(kind, cin, (h, w),
        arg)` is a part's value (`part_module`) on an input of cin channels and size (h, w);
        stages are taken at their least depth, kernel and SE."""
        def after(stage: StageSpec, size: tuple[int, int]) -> tuple[int, int]:
            return tuple(downsampled(stage.block, stage.stride, n) for n in size)  # type: ignore[return-value]

        def options(st: StageChoices, cin: int) -> list[StageSpec]:
            return [StageSpec(b, min(st.depth), width, st.stride, min(st.kernel), e, min(st.se))
                    for b in st.block for e in (st.expand if BLOCKS[b].uses_expand else (1,))
                    for width in _least_widths(st.width, st.width_step, cin)]

        c, h, w = input_shape
        stems = self.stem[:1] if self.stem_step else self.stem  # a range's least stem is its cheapest
        # (width, size) leaving what is placed so far -> (its value, stem, stages)
        frontier = {(stem, (h, w)): (value("stem", c, (h, w), stem), stem, ()) for stem in stems}
        for st in self.stages:
            nxt: dict[tuple[int, tuple[int, int]], tuple[int, int, tuple[StageSpec, ...]]] = {}
            for (cin, size), (total, stem, stages) in frontier.items():
                for o in options(st, cin):
                    t = combine(total, value("stage", cin, size, o))
                    state = (o.width, after(o, size))
                    if state not in nxt or t < nxt[state][0]:
                        nxt[state] = (t, stem, (*stages, o))
            frontier = nxt
        return min((combine(t, value("head", cin, size, head)), str(spec), spec)
                   for (cin, size), (t, stem, stages) in frontier.items() for head in self.head
                   for spec in [Spec(stem, stages, head)])[2]

    def random_specs(self, n: int, seed: int) -> list[Spec]:
        """`n` specs drawn uniformly with `seed` (for tests and benchmarks)."""
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        return [self.sample(study.ask()) for _ in range(n)]  # the random sampler reads no history


# ---------------------------------------------------------------- loading


def shipped_spaces() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def resolve(name_or_path: str) -> Path:
    """A shipped space by name (`resnet`), or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise InputError(f"search space file {path} does not exist")
        return path
    shipped = SHIPPED / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise InputError(f"unknown search space {name_or_path!r}; shipped: {', '.join(shipped_spaces())}, "
                         "or pass a path to a YAML file")
    return shipped


def load_space(name_or_path: str) -> SearchSpace:
    path = resolve(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_space(data, str(path))


def parse_space(data: Any, source: str) -> SearchSpace:
    def fail(key: str, message: str) -> InputError:
        return InputError(f"{source}: {key}: {message}")

    def choices(value: Any, tp: type, key: str) -> tuple[Any, ...]:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise fail(key, "empty list of choices")
        for v in values:
            if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
                raise fail(key, f"expected {tp.__name__} or a list of them, got {v!r}")
        if len(set(values)) != len(values):
            raise fail(key, f"repeated choices {values}")
        return tuple(values)

    def width_range(value: dict[str, Any], key: str) -> tuple[tuple[int, ...], int]:
        """A range of widths, {min, max, step}: its grid and its step."""
        if set(value) != {"min", "max", "step"} or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
            raise fail(key, f"a range of widths is {{min: 8, max: 256, step: 4}} (three integers), got {value!r}")
        lo, hi, step = value["min"], value["max"], value["step"]
        if not (1 <= lo < hi and step >= 1 and (hi - lo) % step == 0):
            raise fail(key, f"a range needs 1 <= min < max and max - min a multiple of step, got {value!r}")
        return tuple(range(lo, hi + 1, step)), step

    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping with keys {sorted(_TOP_FIELDS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - _TOP_FIELDS, key=str)
    if unknown:
        raise fail(unknown[0], f"unknown key; known: {', '.join(sorted(_TOP_FIELDS))}")
    for required in ("stem", "stages"):
        if required not in data:
            raise fail(required, "missing")
    if not isinstance(data["stages"], list) or not data["stages"]:
        raise fail("stages", "expected a non-empty list of stages")
    stages = []
    for i, raw in enumerate(data["stages"]):
        key = f"stages[{i}]"
        if not isinstance(raw, dict):
            raise fail(key, f"expected a mapping, got {raw!r}")
        unknown = sorted(set(raw) - set(_STAGE_FIELDS), key=str)
        if unknown:
            raise fail(f"{key}.{unknown[0]}", f"unknown key; known: {', '.join(_STAGE_FIELDS)}")
        fields = {}
        width_step = 0
        for name, tp in _STAGE_FIELDS.items():
            if name not in raw and name not in _STAGE_DEFAULTS:
                raise fail(f"{key}.{name}", "missing")
            if name == "width" and isinstance(raw[name], dict):
                fields[name], width_step = width_range(raw[name], f"{key}.width")
                continue
            fields[name] = choices(raw.get(name, _STAGE_DEFAULTS.get(name)), tp, f"{key}.{name}")
        for b in fields["block"]:
            if b not in BLOCKS:
                raise fail(f"{key}.block", f"unknown block {b!r}; known: {', '.join(BLOCKS)}")
        if len(fields["stride"]) != 1 or fields["stride"][0] not in (1, 2):
            raise fail(f"{key}.stride", f"must be one value, 1 or 2, got {list(fields['stride'])}")
        for name in ("depth", "width", "kernel", "expand"):
            bad = [v for v in fields[name] if v < 1 or (name == "kernel" and v % 2 == 0)]
            if bad:
                raise fail(f"{key}.{name}", f"{bad[0]} is not allowed (must be >= 1{', odd' if name == 'kernel' else ''})")
        stages.append(StageChoices(fields["block"], fields["depth"], fields["width"], fields["stride"][0],
                                   fields["kernel"], fields["expand"], fields["se"], width_step))
    stem, stem_step = width_range(data["stem"], "stem") if isinstance(data["stem"], dict) else (
        choices(data["stem"], int, "stem"), 0)
    head = choices(data.get("head", 0), int, "head")
    if min(stem) < 1 or min(head) < 0:
        raise fail("stem" if min(stem) < 1 else "head", "widths must be >= 1 (head: >= 0)")
    name = data.get("name", Path(source).stem)
    return SearchSpace(str(name), str(data.get("description", "")), stem, head, tuple(stages), source, stem_step)


def describe(space: SearchSpace) -> str:
    return f"{space.name} ({space.source}; {space.size():,} specs, {len(space.stages)} stages)"
