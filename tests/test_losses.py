"""Every registered distillation loss: minimum where it holds, T^2 scaling, gradients, shapes,
several teachers of different architectures, member weights, and the two training stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nas_kd.core.errors import InputError
from nas_kd.distill.losses import (
    LOSSES,
    Criterion,
    StudentOutput,
    align,
    attention_map,
    gram,
    loss_class,
    match_stage,
    recipe_features,
    recipe_uses_teachers,
)
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.zoo import teacher_spec
from nas_kd.teaching.cache import Teacher
from nas_kd.teaching.ensemble import Ensemble, Targets

B, K = 4, 10

# two teachers of different depths, widths and resolutions, against a student of other widths
TEACHER_CHANNELS = [[16, 32, 64], [24, 48, 96, 160]]
TEACHER_SIZES = [[16, 8, 4], [16, 8, 4, 2]]
STUDENT_CHANNELS, STUDENT_SIZES = [8, 12, 20], [16, 8, 4]
FEATURE_LOSSES = [name for name, cls in LOSSES.items() if cls.kind == "features"]


def student_output(channels: list[int], sizes: list[int], requires_grad: bool = True) -> StudentOutput:
    feats = [torch.randn(B, c, s, s, requires_grad=requires_grad) for c, s in zip(channels, sizes)]
    return StudentOutput(torch.randn(B, K, requires_grad=requires_grad), feats)


def teacher_targets(channels: list[list[int]], sizes: list[list[int]], weights: list[float] | None = None) -> Targets:
    features = [[torch.randn(B, c, s, s) for c, s in zip(cs, ss)] for cs, ss in zip(channels, sizes)]
    return Targets(torch.randn(len(channels), B, K), features, None if weights is None else torch.tensor(weights))


def make(name: str, student=STUDENT_CHANNELS, teachers=TEACHER_CHANNELS, temperature: float = 4.0):
    return loss_class(name)(student, teachers, temperature)


def test_the_registry_holds_the_papers_methods() -> None:
    assert set(LOSSES) == {"ce", "kl", "hint", "crosslayer", "at", "rtk"}
    assert set(FEATURE_LOSSES) == {"hint", "crosslayer", "at", "rtk"}


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_reach_the_student_and_the_adapters(name: str) -> None:
    loss = make(name)
    student = student_output(STUDENT_CHANNELS, STUDENT_SIZES)
    value = loss(student, teacher_targets(TEACHER_CHANNELS, TEACHER_SIZES), torch.randint(0, K, (B,)))
    assert value.shape == () and torch.isfinite(value) and value.item() > 0
    value.backward()
    touched = [student.logits.grad is not None] + [f.grad is not None for f in student.features]
    assert any(touched), f"{name}: no gradient reaches the student"
    if loss.kind == "features":
        assert student.features[-1].grad is not None and student.features[-1].grad.abs().sum() > 0
    for n, p in loss.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: adapter {n}"


@pytest.mark.parametrize("name", list(LOSSES))
def test_several_real_teachers_of_different_architectures(name: str) -> None:
    """resnet8 (3 stages, 28->7 px) and mobilenetv2_x0_5 (7 stages, 28->4 px) against a 2-stage student."""
    members = [Teacher(n, build(teacher_spec(n), (1, 28, 28), K), None, acc, "test")  # type: ignore[arg-type]
               for n, acc in (("resnet8", 0.9), ("mobilenetv2_x0_5", 0.8))]
    ensemble = Ensemble(members, "val_acc")
    student = build(Spec.parse("c8|basic_d1_w8_s2_k3_e1|inverted_d1_w24_s2_k3_e2"), (1, 28, 28), K)
    loss = loss_class(name)(student.stage_channels, ensemble.feature_channels, 4.0)
    x = torch.randn(B, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    feats = student.forward_features(x)
    value = loss(StudentOutput(student.forward_head(feats[-1]), feats), ensemble(x, "all"), torch.randint(0, K, (B,)))
    value.backward()
    assert torch.isfinite(value)
    assert all(p.grad is not None for p in student.stages[-1].parameters())


def test_kl_is_zero_when_the_student_matches_the_ensemble() -> None:
    kl = make("kl")
    logits = torch.randn(B, K)
    # one member: the student equal to it gives 0; two equal members are the same distribution
    targets = Targets(torch.stack([logits, logits]), None)
    assert kl(StudentOutput(logits, []), targets, torch.zeros(B, dtype=torch.long)).item() == pytest.approx(0, abs=1e-6)


def test_kl_is_scaled_by_t_squared() -> None:
    logits_s, logits_t = torch.randn(B, K), torch.randn(1, B, K)
    for t in (1.0, 2.0, 8.0):
        value = make("kl", temperature=t)(StudentOutput(logits_s, []), Targets(logits_t, None), None)
        raw = F.kl_div(F.log_softmax(logits_s / t, -1), F.softmax(logits_t[0] / t, -1), reduction="batchmean")
        assert value.item() == pytest.approx(raw.item() * t * t, rel=1e-5)


@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_feature_losses_do_not_depend_on_the_temperature(name: str) -> None:
    student = student_output(STUDENT_CHANNELS, STUDENT_SIZES, requires_grad=False)
    targets = teacher_targets(TEACHER_CHANNELS, TEACHER_SIZES)
    values = []
    for t in (1.0, 4.0):
        torch.manual_seed(1)  # the same adapters
        values.append(make(name, temperature=t)(student, targets, None).item())
    assert values[0] == pytest.approx(values[1])


def test_ce_is_cross_entropy_with_labels() -> None:
    logits, labels = torch.randn(B, K), torch.randint(0, K, (B,))
    value = make("ce")(StudentOutput(logits, []), None, labels)
    assert value.item() == pytest.approx(F.cross_entropy(logits, labels).item())


def identity_adapters(loss: torch.nn.Module) -> None:
    """Set every 1x1 adapter to the identity (square ones only) and BN to eval with stats (0, 1)."""
    for module in loss.modules():
        if isinstance(module, torch.nn.Conv2d):
            with torch.no_grad():
                module.weight.copy_(torch.eye(module.out_channels).view(module.out_channels, -1, 1, 1))
    loss.eval()


def test_hint_is_zero_when_the_adapted_student_equals_the_teacher() -> None:
    hint = make("hint", [16], [[16]])
    identity_adapters(hint)
    feature = torch.randn(B, 16, 7, 7)
    value = hint(StudentOutput(torch.randn(B, K), [feature]), Targets(torch.randn(1, B, K), [[feature.clone()]]), None)
    assert value.item() == pytest.approx(0, abs=1e-4)


def test_crosslayer_is_zero_when_the_adapted_student_equals_the_teacher() -> None:
    channels, sizes = [8, 16, 32], [8, 4, 2]
    loss = make("crosslayer", channels, [channels])
    identity_adapters(loss)
    feats = [torch.randn(B, c, s, s) for c, s in zip(channels, sizes)]
    targets = Targets(torch.randn(1, B, K), [[f.clone() for f in feats]])
    assert loss(StudentOutput(torch.randn(B, K), feats), targets, None).item() == pytest.approx(0, abs=1e-4)
    other = [torch.randn_like(f) for f in feats]
    assert loss(StudentOutput(torch.randn(B, K), other), targets, None).item() > 0.1


def test_crosslayer_uses_every_pair_of_teacher_stages_and_per_member_adapters() -> None:
    loss = make("crosslayer")
    assert loss.pairs == [[(0, 1), (0, 2), (1, 2)], [(a, b) for a in range(4) for b in range(a + 1, 4)]]
    # student stage of each teacher stage, by relative depth
    assert loss.student_stage == [[0, 1, 2], [0, 1, 1, 2]]
    assert [[a[0].out_channels for a in m] for m in loss.adapters] == TEACHER_CHANNELS
    assert [[a[0].in_channels for a in m] for m in loss.adapters] == [[8, 12, 20], [8, 12, 12, 20]]


@pytest.mark.parametrize("name", ["at", "rtk"])
def test_attention_losses_are_zero_when_the_student_equals_the_teacher(name: str) -> None:
    feature = torch.randn(B, 16, 8, 8)
    loss = make(name, [16], [[16]])
    value = loss(StudentOutput(torch.randn(B, K), [feature]), Targets(torch.randn(1, B, K), [[feature.clone()]]), None)
    assert value.item() == pytest.approx(0, abs=1e-6)
    # attention maps ignore the channel count: the same map from another width is also 0
    wide = feature.repeat(1, 3, 1, 1)
    value = make(name, [48], [[16]])(StudentOutput(torch.randn(B, K), [wide]), Targets(torch.randn(1, B, K), [[feature]]), None)
    assert value.item() == pytest.approx(0, abs=1e-6)


def test_at_matches_the_paper_formula() -> None:
    s, t = torch.randn(B, 8, 4, 4), torch.randn(B, 16, 8, 8)
    value = make("at", [8], [[16]])(StudentOutput(torch.randn(B, K), [s]), Targets(torch.randn(1, B, K), [[t]]), None)
    a_s = F.normalize(s.pow(2).mean(1).flatten(1), dim=1)
    a_t = F.normalize(F.adaptive_avg_pool2d(t, 4).pow(2).mean(1).flatten(1), dim=1)
    assert value.item() == pytest.approx(1000 * (a_s - a_t).pow(2).mean().item(), rel=1e-5)


def test_rtk_filters_out_keys_below_uniform_attention() -> None:
    loss = make("rtk", [8], [[8, 8, 8]])
    with torch.no_grad():  # queries and keys = the pooled features: attention follows similarity
        for lin in [*loss.queries, *loss.keys]:
            lin.weight.zero_()
            lin.bias.zero_()
            lin.weight[:8, :8] = torch.eye(8) * 10
    on = torch.zeros(1, 8, 1, 1)
    on[:, :4] = 1  # the student's pooled features point along channels 0-3; `far` ones along 4-7
    s = torch.randn(B, 8, 4, 4).abs() * on
    near, far, far2 = s * 1.01, torch.randn(B, 8, 4, 4).abs() * (1 - on), torch.randn(B, 8, 4, 4).abs() * (1 - on)
    value = loss(StudentOutput(torch.randn(B, K), [s]), Targets(torch.randn(1, B, K), [[far, near, far2]]), None)
    # only the similar key survives: the loss is the attention distance to `near`, ~0
    assert value.item() == pytest.approx(0, abs=1e-3)
    only_far = loss(StudentOutput(torch.randn(B, K), [s]), Targets(torch.randn(1, B, K), [[far, far, far2]]), None)
    assert only_far.item() > 1.0


# The losses written out from their papers' formulas, for `test_member_weights_weigh_the_members`:
# plain tensor operations, none of nas_kd's helpers, the adapters' weights read from the loss.
CROSSLAYER_STAGES = [[0, 1, 2], [0, 1, 1, 2]]  # per member, the student stage of each teacher stage
AT_STAGES = [[0, 1, 2], [0, 2, 3]]  # per member, the teacher stage of each student stage


def pooled(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): the mean of each (H/size, W/size) block."""
    b, c, h, w = x.shape
    return x.view(b, c, size, h // size, size, w // size).mean((3, 5))


def same_size(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    size = min(x.shape[-1], y.shape[-1])
    return pooled(x, size), pooled(y, size)


def adapted(adapter: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """1x1 conv, then a fresh BatchNorm in training mode (batch statistics, weight 1, bias 0)."""
    y = torch.einsum("oc,bchw->bohw", adapter[0].weight[:, :, 0, 0], x)
    mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
    return (y - mean) / torch.sqrt(var + 1e-5)


def normalised_gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = same_size(x, y)
    g = torch.einsum("bchw,bdhw->bcd", x, y) / (x.shape[-1] * x.shape[-2])
    return g / g.flatten(1).norm(dim=1)[:, None, None]


def attention(x: torch.Tensor) -> torch.Tensor:
    a = x.pow(2).mean(1).flatten(1)
    return a / a.norm(dim=1, keepdim=True)


def attention_gap(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B,): mean over positions of the squared difference of the attention maps."""
    s, t = same_size(s, t)
    return (attention(s) - attention(t)).pow(2).mean(1)


def kl_formula(loss: torch.nn.Module, s: StudentOutput, t: Targets, w: torch.Tensor) -> float:
    temp = loss.temperature
    p = sum(w[m] * torch.softmax(t.logits[m] / temp, -1) for m in range(len(w)))  # (B, K)
    log_q = torch.log_softmax(s.logits / temp, -1)
    return (temp * temp * (p * (p.log() - log_q)).sum(-1).mean()).item()


def hint_formula(loss: torch.nn.Module, s: StudentOutput, t: Targets, w: torch.Tensor) -> float:
    per_member = []
    for m, f in enumerate(t.features):
        a, b = same_size(adapted(loss.adapters[m], s.features[-1]), f[-1])
        per_member.append((a - b).pow(2).mean())
    return sum(w[m] * per_member[m] for m in range(len(w))).item()


def crosslayer_formula(loss: torch.nn.Module, s: StudentOutput, t: Targets, w: torch.Tensor) -> float:
    per_member = []
    for m, f in enumerate(t.features):
        a = [adapted(loss.adapters[m][i], s.features[j]) for i, j in enumerate(CROSSLAYER_STAGES[m])]
        pairs = [(i, j) for i in range(len(f)) for j in range(i + 1, len(f))]
        per_member.append(sum((normalised_gram(a[i], a[j]) - normalised_gram(f[i], f[j])).pow(2).sum((1, 2)).mean()
                              for i, j in pairs) / len(pairs))
    return sum(w[m] * per_member[m] for m in range(len(w))).item()


def at_formula(loss: torch.nn.Module, s: StudentOutput, t: Targets, w: torch.Tensor) -> float:
    per_member = [sum(attention_gap(x, f[j]).mean() for x, j in zip(s.features, AT_STAGES[m])) / len(s.features)
                  for m, f in enumerate(t.features)]
    return 1000 * sum(w[m] * per_member[m] for m in range(len(w))).item()


def rtk_formula(loss: torch.nn.Module, s: StudentOutput, t: Targets, w: torch.Tensor) -> float:
    keys = [(f, m) for m, member in enumerate(t.features) for f in member]  # every stage of every member
    k = torch.stack([lin(f.mean((2, 3))) for lin, (f, _) in zip(loss.keys, keys)], 1)  # (B, N, 64)
    q = torch.stack([lin(f.mean((2, 3))) for lin, f in zip(loss.queries, s.features)], 1)  # (B, S, 64)
    cosine = torch.einsum("bsd,bnd->bsn", q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True))
    prior = torch.log(torch.stack([w[m] * len(w) for _, m in keys]))  # -inf for a member of weight 0
    attn = torch.softmax(cosine / 0.1 + prior, -1)  # (B, S, N)
    attn = attn * (attn >= 1 / torch.isfinite(prior).sum())  # the representative keys
    attn = attn / attn.sum(-1, keepdim=True)
    dist = torch.stack([torch.stack([attention_gap(x, f) for f, _ in keys], 1) for x in s.features], 1)
    return (1000 * (attn * dist).sum(-1).mean()).item()


FORMULAS = {"kl": kl_formula, "hint": hint_formula, "crosslayer": crosslayer_formula, "at": at_formula,
            "rtk": rtk_formula}


@pytest.mark.parametrize("weights", [[0.25, 0.75], [0.0, 1.0]])
@pytest.mark.parametrize("name", ["kl", *FEATURE_LOSSES])
def test_member_weights_weigh_the_members(name: str, weights: list[float]) -> None:
    """Two weighted members of different depths, widths and resolutions: each loss equals its
    formula, a non-zero value, so a loss that reads member 0 alone, ignores or swaps the weights
    or loses a factor fails."""
    assert set(FORMULAS) == {"kl", *FEATURE_LOSSES}  # a new loss needs its formula here
    torch.manual_seed(3)
    student = student_output(STUDENT_CHANNELS, STUDENT_SIZES, requires_grad=False)
    targets = teacher_targets(TEACHER_CHANNELS, TEACHER_SIZES, weights)
    loss = make(name)
    with torch.no_grad():
        expected = FORMULAS[name](loss, student, targets, torch.tensor(weights))
        value = loss(student, targets, None).item()
    assert expected > 0.01 and value == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("i", "n_from", "n_to", "expected"), [
    (0, 3, 3, 0), (2, 3, 3, 2), (0, 3, 7, 1), (1, 3, 7, 4), (2, 3, 7, 6), (0, 7, 3, 0), (3, 7, 3, 1), (6, 7, 3, 2),
    (0, 1, 4, 3), (1, 4, 1, 0),
])
def test_match_stage_by_relative_depth(i: int, n_from: int, n_to: int, expected: int) -> None:
    assert match_stage(i, n_from, n_to) == expected


def test_gram_is_normalised_and_scale_free() -> None:
    x, y = torch.randn(B, 6, 8, 8), torch.randn(B, 10, 4, 4)
    g = gram(x, y)
    assert g.shape == (B, 6, 10)
    assert torch.allclose(g.flatten(1).norm(dim=1), torch.ones(B))
    assert torch.allclose(gram(3 * x, y), g, atol=1e-6)
    expected = torch.einsum("bchw,bdhw->bcd", F.adaptive_avg_pool2d(x, 4), y)
    assert torch.allclose(g, expected / expected.flatten(1).norm(dim=1)[:, None, None], atol=1e-6)


def test_attention_map_is_unit_length() -> None:
    a = attention_map(torch.randn(B, 5, 6, 6))
    assert a.shape == (B, 36) and torch.allclose(a.norm(dim=1), torch.ones(B))


@pytest.mark.parametrize(("student", "teacher", "expected"), [
    ((8, 8), (4, 4), (4, 4)), ((4, 4), (8, 8), (4, 4)), ((7, 7), (7, 7), (7, 7)), ((14, 14), (7, 7), (7, 7)),
])
def test_align_pools_the_larger_map(student, teacher, expected) -> None:
    s, t = align(torch.randn(2, 3, *student), torch.randn(2, 5, *teacher))
    assert s.shape[-2:] == t.shape[-2:] == expected


def test_criterion_weights_and_skips_zero_weights() -> None:
    criterion = Criterion({"ce": 0.5, "kl": 2.0, "hint": 0.0}, STUDENT_CHANNELS, TEACHER_CHANNELS, 3.0)
    assert set(criterion.losses) == {"ce", "kl"}
    assert criterion.uses_teachers and criterion.features is None and criterion.kinds() == {"logits"}
    student = student_output(STUDENT_CHANNELS, STUDENT_SIZES, requires_grad=False)
    targets, labels = teacher_targets(TEACHER_CHANNELS, TEACHER_SIZES), torch.randint(0, K, (B,))
    expected = 0.5 * criterion.losses["ce"](student, targets, labels) + 2.0 * criterion.losses["kl"](student, targets, labels)
    assert criterion(student, targets, labels).item() == pytest.approx(expected.item())
    assert not Criterion({"ce": 1.0}, [8], [[8]], 1.0).uses_teachers


def test_criterion_by_kind_and_feature_sets() -> None:
    criterion = Criterion({"ce": 1.0, "kl": 1.0, "at": 2.0, "hint": 0.5}, STUDENT_CHANNELS, TEACHER_CHANNELS, 4.0)
    assert criterion.features == "all" and criterion.kinds() == {"logits", "features"}
    student = student_output(STUDENT_CHANNELS, STUDENT_SIZES, requires_grad=False)
    targets, labels = teacher_targets(TEACHER_CHANNELS, TEACHER_SIZES), torch.randint(0, K, (B,))
    parts = {n: criterion.losses[n](student, targets, labels).item() for n in criterion.losses}
    assert criterion(student, targets, labels, "features").item() == pytest.approx(2 * parts["at"] + 0.5 * parts["hint"], rel=1e-5)
    assert criterion(student, targets, labels, "logits").item() == pytest.approx(parts["ce"] + parts["kl"], rel=1e-5)
    assert recipe_features({"ce": 1, "hint": 1}) == "last"
    assert recipe_features({"ce": 1, "hint": 1, "crosslayer": 1}) == "all"
    assert recipe_features({"ce": 1, "kl": 1, "rtk": 0}) is None
    assert recipe_uses_teachers({"ce": 1, "at": 1}) and not recipe_uses_teachers({"ce": 1, "kl": 0})


@pytest.mark.parametrize(("weights", "temperature", "message"), [
    ({"ce": 0.0}, 4.0, "weight 0"), ({"ce": 1.0}, 0.0, "temperature"),
    ({"nope": 1.0}, 4.0, "unknown distillation loss 'nope'; known: ce, kl, hint, crosslayer, at, rtk"),
])
def test_bad_recipes(weights, temperature, message) -> None:
    with pytest.raises(InputError, match=message):
        Criterion(weights, [8], [[8]], temperature)
