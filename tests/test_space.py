"""Search spaces: loading, size, sampling through Optuna, the smallest student, the student of least
peak memory, and bad YAML."""

from __future__ import annotations

import functools
import itertools
import math
import re
from pathlib import Path

import optuna
import pytest
import torch

from nas_kd.core.errors import InputError
from nas_kd.device.memory import peak_activations
from nas_kd.nets.arch import BLOCKS, Spec, StageSpec, build, downsampled
from nas_kd.nets.cost import Cost, count
from nas_kd.nets.space import SearchSpace, load_space, parse_space, part_module, shipped_spaces

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Counting runs networks of a few thousand MACs: on a busy 2-core machine a second thread makes
    each count 5-30x slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stage_options(space: SearchSpace, i: int) -> set[StageSpec]:
    """Every distinct stage of stage i: all combinations, expand forced to 1 where the block ignores it."""
    st = space.stages[i]
    return {StageSpec(b, d, w, st.stride, k, e if BLOCKS[b].uses_expand else 1, se)
            for b, d, w, k, e, se in itertools.product(st.block, st.depth, st.width, st.kernel, st.expand, st.se)}


def all_specs(space: SearchSpace) -> set[Spec]:
    stages = [sorted(stage_options(space, i), key=str) for i in range(len(space.stages))]
    return {Spec(stem, combo, head) for stem in space.stem for head in space.head for combo in itertools.product(*stages)}


@functools.cache
def cost_of(spec: Spec) -> Cost:
    return count(build(spec, SHAPE, 10, channels_last=False), SHAPE)


# Small enough to enumerate and to count every spec of (a few seconds in all).
TINY = {
    # both residual blocks in each stage, bottleneck with two expansions (larger = cheaper)
    "basic-or-bottleneck": {
        "stem": [8, 12],
        "stages": [{"block": ["basic", "bottleneck"], "depth": [1, 2], "width": 16, "expand": [2, 4]},
                   {"block": ["basic", "bottleneck"], "depth": 1, "width": 24, "stride": 2, "expand": [2, 4]}]},
    "inverted-or-dwsep": {
        "stem": 8, "head": [0, 32],
        "stages": [{"block": ["inverted", "dwsep"], "depth": 1, "width": [8, 16], "expand": [1, 3],
                    "se": [False, True]}]},
    # a stage as wide as its input needs no shortcut convolution, so the larger width is the cheaper one
    "bottleneck-keeps-width": {
        "stem": 16,
        "stages": [{"block": "bottleneck", "depth": 1, "width": [12, 16], "expand": 4}]},
}
# Only enumerated (never built): every field a choice, and a basic block given expand choices it ignores.
COUNTED = {
    **TINY,
    "every-field": {
        "stem": [8, 16], "head": [0, 64],
        "stages": [{"block": ["basic", "bottleneck", "conv"], "depth": [1, 2], "width": [8, 16, 24], "kernel": [3, 5],
                    "expand": [2, 4, 6], "se": [False, True]},
                   {"block": "basic", "depth": 2, "width": 32, "stride": 2, "expand": [2, 4]}]},
}


def tiny(name: str) -> SearchSpace:
    return parse_space(COUNTED[name], name)


# ---------------------------------------------------------------- shipped spaces


def test_shipped_names():
    assert shipped_spaces() == ["mobilenetv2", "resnet", "resnet-v1"]


@pytest.mark.parametrize("name", shipped_spaces())
def test_shipped_space_loads(name):
    space = load_space(name)
    assert space.name == name
    assert Path(space.source).name == f"{name}.yaml"
    assert space.description
    assert load_space(space.source) == space  # by path too
    expected = len(space.stem) * len(space.head) * math.prod(len(stage_options(space, i))
                                                             for i in range(len(space.stages)))
    assert space.size() == expected > 1


def test_shipped_sizes():
    # stem 32 widths x (3 block/expand x 5 depths x 32 widths) x (3 x 5 x 64 x 2 kernels x 2 se)
    # x (3 x 5 x 128 x 2 x 2): widths on a grid of 4, 4-128, 4-256 and 4-512
    assert load_space("resnet").size() == 32 * (3 * 5 * 32) * (3 * 5 * 64 * 4) * (3 * 5 * 128 * 4)
    # stem 2 x (3 block/expand x 2 depths x 3 widths) x (3 x 3 x 3 x 2 kernels x 2 se)^2
    assert load_space("resnet-v1").size() == 2 * 18 * 108 * 108
    assert load_space("mobilenetv2").size() == 2 * 2 * 6 * 24 * 72 * 72 * 48


@pytest.mark.parametrize("name", sorted(COUNTED))
def test_size_is_brute_force_count(name):
    space = tiny(name)
    assert space.size() == len(all_specs(space))


def spaces_to_sample() -> list[str]:
    return [*shipped_spaces(), *sorted(COUNTED)]


def get_space(name: str) -> SearchSpace:
    return load_space(name) if name in shipped_spaces() else tiny(name)


@pytest.mark.parametrize("name", spaces_to_sample())
def test_random_specs_deterministic(name):
    space = get_space(name)
    specs = space.random_specs(20, seed=11)
    assert specs == space.random_specs(20, seed=11)
    assert len(specs) == 20
    if space.size() > 1000:
        assert specs != space.random_specs(20, seed=12)
        assert len(set(specs)) > 15


@pytest.mark.parametrize("name", spaces_to_sample())
def test_specs_round_trip_through_optuna(name):
    space = get_space(name)
    study = optuna.create_study()
    specs = space.random_specs(20, seed=5)
    if name in COUNTED:
        assert set(specs) <= all_specs(space)
    for spec in specs:
        params = space.params_of(spec)
        study.enqueue_trial(params)
        trial = study.ask()
        assert space.sample(trial) == spec
        assert trial.params == params  # exactly the choices asked, expand only where used
        study.tell(trial, 0.0)
        assert Spec.parse(str(spec)) == spec
        assert Spec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_spec_round_trips(name):
    space = tiny(name)
    study = optuna.create_study()
    for spec in sorted(all_specs(space), key=str):
        study.enqueue_trial(space.params_of(spec))
        trial = study.ask()
        assert space.sample(trial) == spec
        study.tell(trial, 0.0)


def test_params_of_names_the_choice_outside_the_space():
    ranged = load_space("resnet")
    spec = ranged.random_specs(1, seed=0)[0]
    odd = Spec(spec.stem, (StageSpec("basic", 1, 22, 1), *spec.stages[1:]), spec.head)
    with pytest.raises(InputError, match=r"s0_width=22 is not in space 'resnet' \(a width of 4 to 128 in steps of 4\)"):
        ranged.params_of(odd)
    space = load_space("resnet-v1")
    spec = space.random_specs(1, seed=0)[0]
    wide = Spec(spec.stem, (StageSpec("basic", 1, 20, 1), *spec.stages[1:]), spec.head)
    with pytest.raises(InputError, match=r"s0_width=20 is not in space 'resnet-v1' \(choices \[16, 24, 32\]\)"):
        space.params_of(wide)
    with pytest.raises(InputError, match="has 1 stages; space 'resnet-v1' has 3"):
        space.params_of(Spec(16, spec.stages[:1]))
    strided = Spec(spec.stem, (StageSpec("basic", 1, 16, 2), *spec.stages[1:]), spec.head)
    with pytest.raises(InputError, match="stage 0 stride 2 is fixed to 1"):
        space.params_of(strided)


# ---------------------------------------------------------------- smallest


@pytest.mark.parametrize("name", sorted(TINY))
def test_smallest_is_brute_force_minimum(name):
    space = tiny(name)
    costs = {spec: cost_of(spec) for spec in all_specs(space)}
    (macs_spec, macs_cost), (params_spec, params_cost) = space.smallest(SHAPE, 10)
    assert macs_cost == cost_of(macs_spec) and params_cost == cost_of(params_spec)
    assert macs_spec in costs and params_spec in costs
    assert macs_cost.macs == min(c.macs for c in costs.values())
    assert params_cost.params == min(c.params for c in costs.values())


def test_larger_expand_makes_bottleneck_cheaper():
    """What the basic-or-bottleneck case relies on: the least expand is not the cheapest."""
    e2, e4 = (Spec(8, (StageSpec("bottleneck", 1, 16, 1, 3, e),)) for e in (2, 4))
    assert cost_of(e4).macs < cost_of(e2).macs and cost_of(e4).params < cost_of(e2).params
    (macs_spec, _), _ = tiny("basic-or-bottleneck").smallest(SHAPE, 10)
    assert [(s.block, s.expand) for s in macs_spec.stages] == [("bottleneck", 4), ("bottleneck", 4)]


@pytest.mark.parametrize("name", shipped_spaces())
def test_shipped_smallest_undercuts_samples(name):
    space = load_space(name)
    (macs_spec, macs_cost), (params_spec, params_cost) = space.smallest(SHAPE, 10)
    space.params_of(macs_spec), space.params_of(params_spec)  # raise unless both are in the space
    for spec in space.random_specs(16, seed=1):
        cost = cost_of(spec)
        assert macs_cost.macs <= cost.macs and params_cost.params <= cost.params


# ---------------------------------------------------------------- least peak memory


@functools.cache
def peak_of(spec: Spec, shape: tuple[int, int, int] = SHAPE) -> int:
    return peak_activations(build(spec, shape, 10, channels_last=False), shape)


@pytest.mark.parametrize("name", sorted(TINY))
def test_least_peak_is_brute_force_minimum(name):
    space = tiny(name)
    spec, peak = space.least_peak(SHAPE, 10, peak_activations)
    assert spec in all_specs(space) and peak == peak_of(spec)
    assert peak == min(peak_of(s) for s in all_specs(space))


@pytest.mark.parametrize("name, shape", [("resnet", SHAPE), ("mobilenetv2", (3, 32, 32))])
def test_peak_is_the_greatest_of_its_parts(name, shape):
    """What makes least_peak exact: between the stem, the stages and the head only the tensor
    passed on is alive."""
    space = load_space(name)
    for spec in space.random_specs(12, seed=2):
        c, h, w = shape
        parts = [peak_activations(part_module("stem", c, spec.stem, 10), shape)]
        cin, size = spec.stem, (h, w)
        for st in spec.stages:
            parts.append(peak_activations(part_module("stage", cin, st, 10), (cin, *size)))
            cin, size = st.width, tuple(downsampled(st.block, st.stride, n) for n in size)
        parts.append(peak_activations(part_module("head", cin, spec.head, 10), (cin, *size)))
        assert peak_of(spec, shape) == max(parts), spec


@pytest.mark.parametrize("name", shipped_spaces())
def test_shipped_least_peak_undercuts_samples(name):
    space = load_space(name)
    spec, peak = space.least_peak(SHAPE, 10, peak_activations)
    space.params_of(spec)  # raises unless it is in the space
    assert all(peak <= peak_of(s) for s in space.random_specs(40, seed=3))


# ---------------------------------------------------------------- bad files

GOOD_STAGE = "  - {block: basic, depth: 1, width: 16}\n"


def with_stage(stage: str, top: str = "stem: 16\n") -> str:
    return top + "stages:\n" + GOOD_STAGE + f"  - {stage}\n"


BAD = [
    ("not-a-mapping", "- 1\n- 2\n", "expected a mapping with keys"),
    ("empty-file", "", "expected a mapping with keys"),
    ("unknown-top-key", "stem: 16\nstges: []\nstages:\n" + GOOD_STAGE, "stges: unknown key"),
    ("missing-stem", "stages:\n" + GOOD_STAGE, "stem: missing"),
    ("missing-stages", "stem: 16\n", "stages: missing"),
    ("empty-stages", "stem: 16\nstages: []\n", "stages: expected a non-empty list"),
    ("stages-not-list", "stem: 16\nstages: {block: basic}\n", "stages: expected a non-empty list"),
    ("stage-not-mapping", with_stage("basic"), "stages[1]: expected a mapping"),
    ("unknown-stage-key", with_stage("{block: basic, depth: 1, widht: 16}"), "stages[1].widht: unknown key"),
    ("missing-width", with_stage("{block: basic, depth: 1}"), "stages[1].width: missing"),
    ("unknown-block", with_stage("{block: resnext, depth: 1, width: 16}"), "stages[1].block: unknown block 'resnext'"),
    ("stride-choice", with_stage("{block: basic, depth: 1, width: 16, stride: [1, 2]}"), "stages[1].stride:"),
    ("stride-3", with_stage("{block: basic, depth: 1, width: 16, stride: 3}"), "stages[1].stride:"),
    ("depth-0", with_stage("{block: basic, depth: 0, width: 16}"), "stages[1].depth: 0 is not allowed"),
    ("even-kernel", with_stage("{block: basic, depth: 1, width: 16, kernel: [3, 4]}"), "stages[1].kernel: 4 is not allowed"),
    ("expand-0", with_stage("{block: bottleneck, depth: 1, width: 16, expand: 0}"), "stages[1].expand: 0 is not allowed"),
    ("width-abc", with_stage("{block: basic, depth: 1, width: abc}"), "stages[1].width: expected int"),
    ("width-float", with_stage("{block: basic, depth: 1, width: 16.5}"), "stages[1].width: expected int"),
    ("depth-bool", with_stage("{block: basic, depth: true, width: 16}"), "stages[1].depth: expected int"),
    ("se-int", with_stage("{block: basic, depth: 1, width: 16, se: 1}"), "stages[1].se: expected bool"),
    ("repeated-choices", with_stage("{block: basic, depth: 1, width: [16, 24, 16]}"), "stages[1].width: repeated choices"),
    ("empty-choices", with_stage("{block: basic, depth: 1, width: []}"), "stages[1].width: empty list"),
    ("stem-0", with_stage(GOOD_STAGE.strip("- \n"), top="stem: [0, 16]\n"), "stem: widths must be >= 1"),
    ("head-negative", with_stage(GOOD_STAGE.strip("- \n"), top="stem: 16\nhead: -1\n"), "head: widths must be"),
    ("stem-abc", "stem: abc\nstages:\n" + GOOD_STAGE, "stem: expected int"),
    ("invalid-yaml", "stem: [16, 24\nstages:\n" + GOOD_STAGE, "not valid YAML"),
    ("tab-indent", "stem: 16\nstages:\n\t- {block: basic}\n", "not valid YAML"),
    # YAML keys need not be strings: a number among the unknown keys must not break the sorting
    ("non-string-key", "stem: 16\n1: one\nextra: two\nstages:\n" + GOOD_STAGE, ": unknown key"),
]


@pytest.mark.parametrize("text,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_space_file(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        load_space(str(path))
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_good_file_with_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(with_stage("{block: bottleneck, depth: [1, 2], width: 32, stride: 2, expand: [2, 4]}"))
    space = load_space(str(path))
    assert (space.name, space.description, space.stem, space.head, space.source) == ("mine", "", (16,), (0,), str(path))
    assert [(s.stride, s.kernel, s.expand, s.se) for s in space.stages] == [(1, (3,), (1,), (False,)),
                                                                            (2, (3,), (2, 4), (False,))]
    assert space.size() == 4


def test_unknown_shipped_name_lists_shipped():
    with pytest.raises(InputError, match=re.escape("unknown search space 'resnt'; shipped: mobilenetv2, resnet")):
        load_space("resnt")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=f"search space file {re.escape(str(tmp_path))}/absent.yaml does not exist"):
        load_space(str(tmp_path / "absent.yaml"))
