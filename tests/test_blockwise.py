"""Block-wise supervision (DNA): the stage map, R^2 scores, training, memoisation and shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from nas_kd.core.config import TrainConfig
from nas_kd.core.errors import InputError
from nas_kd.data.batches import BatchIterator, seeded_subset
from nas_kd.data.datasets import Augment, Dataset, Split
from nas_kd.distill.blockwise import STEM, BlockwiseScorer, StageNet, most_accurate, stage_key, stage_map
from nas_kd.distill.losses import align
from nas_kd.nets.arch import BLOCKS, Spec, build
from nas_kd.teaching.cache import Teacher

TEACHER = "c8|basic_d1_w8_s1_k3_e1|basic_d1_w16_s2_k3_e1"
CFG = TrainConfig(batch_size=32)
SUBSET, VAL = 128, 60
SIZE = 12  # pixels: small images keep every test fast


@pytest.fixture(scope="module")
def tiny_dataset() -> Dataset:
    """Random 1x12x12 images, smoothed so neighbouring pixels correlate as in real images."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        x = torch.nn.functional.avg_pool2d(torch.rand(n, 1, SIZE + 2, SIZE + 2, generator=g), 3, 1)
        return Split((x * 255).to(torch.uint8), torch.randint(0, 2, (n,), generator=g))

    return Dataset("tiny", split(200), split(80), split(8), ("a", "b"), (0.5,), (0.15,), Augment(0, False))


@pytest.fixture(scope="module")
def teacher(tiny_dataset) -> Teacher:
    """A tiny untrained teacher whose BatchNorm scales and shifts are random: at their
    initialisation (the residual branch's BN at 0) every stage would be the identity."""
    torch.manual_seed(1)
    model = build(Spec.parse(TEACHER), tiny_dataset.input_shape, tiny_dataset.num_classes)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return Teacher("tiny", model.eval(), None, 0.5, "test")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def batches(tiny_dataset) -> BatchIterator:
    return BatchIterator(tiny_dataset.train, tiny_dataset, CFG.batch_size, seed=0, views=1, augment=False,
                         indices=seeded_subset(len(tiny_dataset.train), SUBSET, 0))


def make_scorer(teacher: Teacher, tiny_dataset, batches: BatchIterator, epochs: int) -> BlockwiseScorer:
    return BlockwiseScorer(teacher, tiny_dataset, batches, CFG, epochs, seed=0, val_images=VAL)


@pytest.mark.parametrize(("n_student", "n_teacher", "expected"), [
    (3, 3, [(STEM, 0), (0, 1), (1, 2)]),
    (2, 3, [(STEM, 1), (1, 2)]),
    (1, 3, [(STEM, 2)]),
    (3, 2, [(STEM, 0), (0, 0), (0, 1)]),
    (4, 2, [(STEM, 0), (0, 0), (0, 1), (1, 1)]),
])
def test_stage_map(n_student: int, n_teacher: int, expected: list[tuple[int, int]]) -> None:
    assert stage_map(n_student, n_teacher) == expected


def test_cache_holds_every_teacher_map_in_float16(teacher, tiny_dataset, batches) -> None:
    scorer = make_scorer(teacher, tiny_dataset, batches, epochs=0)
    shapes = [(8, 12, 12), (8, 12, 12), (16, 6, 6)]  # stem, stage 0, stage 1
    assert [tuple(t.shape) for t in scorer.train_maps] == [(SUBSET, *s) for s in shapes]
    assert [tuple(t.shape) for t in scorer.val_maps] == [(VAL, *s) for s in shapes]
    assert all(t.dtype == torch.float16 for t in (*scorer.train_maps, *scorer.val_maps))
    assert scorer.nbytes == 2 * (SUBSET + VAL) * (2 * 8 * 12 * 12 + 16 * 6 * 6)
    # the row of a training position holds the teacher's maps of that image
    position = batches.indices[5:6]
    with torch.no_grad():
        expected = teacher.model.forward_features(batches.images(position, 0))[-1]
    row = scorer.slot[position]
    assert torch.allclose(scorer.train_maps[-1][row].float(), expected, atol=1e-2)


def set_identity(adapt: nn.Sequential) -> None:
    conv, bn = adapt
    with torch.no_grad():
        conv.weight.copy_(torch.eye(conv.out_channels, conv.in_channels)[:, :, None, None])
    bn.reset_parameters()  # weight 1, bias 0, running mean 0, running variance 1
    bn.eps = 0.0


def test_the_teachers_own_stage_scores_one(teacher, tiny_dataset, batches) -> None:
    scorer = make_scorer(teacher, tiny_dataset, batches, epochs=0)
    spec = Spec.parse(TEACHER)
    for i in range(2):
        net = scorer.stage_net(spec, i)
        untouched = scorer.r2(net)
        net.stage.load_state_dict(teacher.model.stages[i].state_dict())
        set_identity(net.adapt_in)
        set_identity(net.adapt_out)
        # float16 inputs and targets: equal up to their rounding
        assert scorer.r2(net) == pytest.approx(1.0, abs=1e-4)
        assert untouched < 0.9


def test_training_raises_the_score(teacher, tiny_dataset, batches) -> None:
    scorer = make_scorer(teacher, tiny_dataset, batches, epochs=2)
    spec = Spec.parse("c4|basic_d1_w12_s1_k3_e1|basic_d1_w12_s2_k3_e1")
    for i in range(2):
        net = scorer.stage_net(spec, i)
        before = scorer.r2(net)
        assert scorer.train_stage(net) > 0.0  # seconds
        after = scorer.r2(net)
        # better than untrained, and better than predicting the target's mean everywhere (R^2 = 0)
        assert after > max(before, 0.0), (i, before, after)
        assert after < 1.0


def test_shared_stages_are_trained_once(teacher, tiny_dataset, batches) -> None:
    scorer = make_scorer(teacher, tiny_dataset, batches, epochs=1)
    a = Spec.parse("c4|basic_d1_w8_s1_k3_e1|basic_d1_w16_s2_k3_e1")
    b = Spec.parse("c4|basic_d1_w8_s1_k3_e1|basic_d2_w16_s2_k3_e1")  # stage 0 as in a
    c = Spec.parse("c8|basic_d1_w8_s1_k3_e1|basic_d1_w16_s2_k3_e1")  # stage 0 reads another width
    mean_a, stages_a = scorer.score(a)
    assert scorer.trained == 2 and mean_a == pytest.approx(sum(stages_a) / 2)
    _, stages_b = scorer.score(b)
    assert scorer.trained == 3 and stages_b[0] == stages_a[0]
    scorer.score(c)  # its stage 1 is a's: same width before it, same token
    assert scorer.trained == 4
    assert scorer.score(a) == (mean_a, stages_a) and scorer.trained == 4
    assert set(scorer.scores) == {"0/2|c4|basic_d1_w8_s1_k3_e1", "1/2|c8|basic_d1_w16_s2_k3_e1",
                                  "1/2|c8|basic_d2_w16_s2_k3_e1", "0/2|c8|basic_d1_w8_s1_k3_e1"}
    assert stage_key(a, 1) == stage_key(c, 1)
    assert scorer.cost_seconds > 0.0

    # a stage's score does not depend on which spec asked first; a resumed study reuses scores
    fresh = make_scorer(teacher, tiny_dataset, batches, epochs=1)
    assert fresh.score(b)[1] == stages_b
    resumed = make_scorer(teacher, tiny_dataset, batches, epochs=1)
    resumed.preload(dict(scorer.scores))
    assert resumed.score(a) == (mean_a, stages_a) and resumed.trained == 0


@pytest.mark.parametrize(("scores", "message"), [
    ({"stage zero": 0.5}, "bad block-wise stage key 'stage zero'"),
    ({"0/2|c4|basic_d1_w8_s1_k3_e1": "high"}, "must be a finite number, got 'high'"),
    ({"0/2|c4|basic_d1_w8_s1_k3_e1": math.nan}, "must be a finite number, got nan"),
])
def test_preload_refuses_bad_scores(teacher, tiny_dataset, batches, scores, message) -> None:
    with pytest.raises(InputError, match=message):
        make_scorer(teacher, tiny_dataset, batches, epochs=0).preload(scores)


@pytest.mark.parametrize("block", list(BLOCKS))
def test_other_widths_strides_and_blocks(teacher, tiny_dataset, batches, block: str) -> None:
    """Three student stages against two teacher stages (S > T: stages 0 and 1 both end at teacher
    stage 0). Stage 0 halves the size where the teacher keeps it (6 against 12), stage 2 keeps it
    where the teacher halves it (12 against 6); no width is the teacher's."""
    expand = 2 if BLOCKS[block].uses_expand else 1
    spec = Spec.parse(f"c4|{block}_d1_w12_s2_k3_e{expand}|{block}_d1_w6_s1_k3_e{expand}"
                      f"|{block}_d1_w10_s1_k3_e{expand}")
    scorer = make_scorer(teacher, tiny_dataset, batches, epochs=1)
    expected_out = [(8, 6, 6), (8, 12, 12), (16, 12, 12)]  # teacher widths, student sizes
    for i, (source, target) in enumerate(stage_map(3, 2)):
        net = scorer.stage_net(spec, i)
        assert isinstance(net, StageNet) and (net.source, net.target) == (source, target)
        x = scorer.val_maps[source + 1][:2].float()
        out = net(x)
        assert tuple(out.shape[1:]) == expected_out[i]
        pred, target_map = align(out, scorer.val_maps[target + 1][:2].float())
        assert pred.shape == target_map.shape
    mean, per_stage = scorer.score(spec)
    assert len(per_stage) == 3 and all(math.isfinite(r) and r <= 1.0 for r in per_stage)
    assert mean == pytest.approx(sum(per_stage) / 3)


def test_most_accurate_member(teacher) -> None:
    other = Teacher("better", teacher.model, None, 0.9, "test")  # type: ignore[arg-type]
    assert most_accurate([teacher, other]) is other


def test_bad_settings_are_input_errors(teacher, tiny_dataset, batches) -> None:
    with pytest.raises(InputError, match="epochs must be >= 0, got -1"):
        make_scorer(teacher, tiny_dataset, batches, epochs=-1)
