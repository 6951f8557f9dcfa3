"""Teacher training, the on-disk cache, user checkpoints, the ensemble and its cached targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nas_kd.core.config import TrainConfig
from nas_kd.core.errors import InputError
from nas_kd.data.batches import BatchIterator
from nas_kd.nets.arch import build
from nas_kd.nets.zoo import teacher_spec
from nas_kd.teaching.cache import Teacher, load_or_train
from nas_kd.teaching.ensemble import CachedTargets, Ensemble, LiveTargets, soft_targets

CPU = torch.device("cpu")
QUICK = TrainConfig(batch_size=128)


@pytest.fixture(scope="module")
def cached_teacher(tmp_path_factory: pytest.TempPathFactory, mini_dataset) -> tuple[Teacher, Path]:
    cache = tmp_path_factory.mktemp("cache")
    teacher = load_or_train("resnet8", mini_dataset, 1, 0, QUICK, cache, CPU, min_gain=0, progress=False, log=lambda m: None)
    return teacher, cache


def test_trained_teacher_is_cached_and_reused(cached_teacher, mini_dataset) -> None:
    teacher, cache = cached_teacher
    assert teacher.source == "trained"
    files = list((cache / "teachers").glob("resnet8-fashion-mnist-*.safetensors"))
    assert len(files) == 1
    again = load_or_train("resnet8", mini_dataset, 1, 0, QUICK, cache, CPU, min_gain=0, progress=False, log=lambda m: None)
    assert again.source == "cache"
    assert again.val_acc == teacher.val_acc
    for (k, a), b in zip(teacher.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("change", [{"epochs": 2}, {"seed": 1}, {"cfg": TrainConfig(batch_size=64)}])
def test_cache_key_covers_what_determines_a_teacher(cached_teacher, mini_dataset, change) -> None:
    from nas_kd.teaching.cache import cache_key

    base = {"epochs": 1, "seed": 0, "cfg": QUICK}
    assert cache_key("resnet8", mini_dataset, **base) != cache_key("resnet8", mini_dataset, **{**base, **change})


def test_user_checkpoints_torch_and_safetensors(cached_teacher, mini_dataset, tmp_path) -> None:
    teacher, _ = cached_teacher
    pt = tmp_path / "resnet8.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in teacher.model.state_dict().items()}}, pt)
    loaded = load_or_train("resnet8", mini_dataset, 1, 0, QUICK, tmp_path / "unused", CPU, min_gain=0, checkpoint=pt,
                           progress=False, log=lambda m: None)
    assert loaded.source == str(pt)
    assert loaded.val_acc == teacher.val_acc
    assert not (tmp_path / "unused").exists()  # nothing trained


@pytest.mark.parametrize(("content", "message"), [
    (b"not a checkpoint", "cannot read checkpoint"),
    (None, "does not exist"),
])
def test_unreadable_checkpoints(mini_dataset, tmp_path, content, message) -> None:
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_or_train("resnet8", mini_dataset, 1, 0, QUICK, tmp_path, CPU, min_gain=0, checkpoint=path, progress=False)


def test_checkpoint_of_another_architecture_is_refused(mini_dataset, tmp_path) -> None:
    path = tmp_path / "resnet14.pt"
    torch.save(build(teacher_spec("resnet14"), mini_dataset.input_shape, 10).state_dict(), path)
    with pytest.raises(InputError, match=r"does not fit teacher resnet8 .*: unexpected 'stages.0.1.conv1.0.weight'"):
        load_or_train("resnet8", mini_dataset, 1, 0, QUICK, tmp_path, CPU, min_gain=0, checkpoint=path, progress=False)


def test_unknown_teacher_lists_the_zoo() -> None:
    with pytest.raises(InputError, match="unknown teacher 'resnet19'; known: resnet8, resnet14, resnet20"):
        teacher_spec("resnet19")


def test_soft_targets_average_softened_probabilities() -> None:
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 4.0]]])  # (M=2, B=1, K=2)
    expected = (F.softmax(logits[0] / 2, -1) + F.softmax(logits[1] / 2, -1)) / 2
    assert torch.allclose(soft_targets(logits, 2.0), expected)
    weighted = 0.25 * F.softmax(logits[0] / 2, -1) + 0.75 * F.softmax(logits[1] / 2, -1)
    assert torch.allclose(soft_targets(logits, 2.0, torch.tensor([0.25, 0.75])), weighted)


@pytest.mark.parametrize(("weighting", "accuracies", "expected"), [
    ("mean", [0.9, 0.6], [0.5, 0.5]), ("val_acc", [0.9, 0.6], [0.6, 0.4]), ("val_acc", [0.5, 0.5], [0.5, 0.5]),
])
def test_ensemble_weighting(mini_dataset, weighting: str, accuracies: list[float], expected: list[float]) -> None:
    members = [Teacher(f"t{i}", build(teacher_spec("resnet8"), mini_dataset.input_shape, 10), None, acc, "test")  # type: ignore[arg-type]
               for i, acc in enumerate(accuracies)]
    ensemble = Ensemble(members, weighting)
    assert ensemble.weights.tolist() == pytest.approx(expected)
    assert torch.equal(ensemble(mini_dataset.train.x[:2].float(), None).weights, ensemble.weights)
    with pytest.raises(InputError, match="unknown ensemble weighting 'best'; known: mean, val_acc"):
        Ensemble(members, "best")


def two_member_ensemble(mini_dataset) -> Ensemble:
    members = []
    for name in ("resnet8", "mobilenetv2_x0_5"):
        model = build(teacher_spec(name), mini_dataset.input_shape, mini_dataset.num_classes).eval()
        members.append(Teacher(name, model, None, 0.0, "test"))  # type: ignore[arg-type]
    return Ensemble(members)


def test_cached_targets_equal_live_targets_for_every_view(mini_dataset) -> None:
    torch.manual_seed(0)
    ensemble = two_member_ensemble(mini_dataset)
    batches = BatchIterator(mini_dataset.train, mini_dataset, 64, seed=5, views=3)
    cached = CachedTargets(ensemble, batches, features="last", chunk=100, progress=False)
    assert cached.logits.shape == (3, 2, len(mini_dataset.train), 10)
    n = len(mini_dataset.train)
    assert [[tuple(f.shape) for f in member] for member in cached.features] == [[(3, n, 64, 7, 7)], [(3, n, 160, 4, 4)]]
    live = LiveTargets(ensemble, features="last")
    for epoch in range(4):  # epoch 3 wraps around to view 0
        batch = next(iter(batches.epoch(epoch)))
        assert batch.view == epoch % 3
        a, b = cached(batch), live(batch)
        assert torch.allclose(a.logits, b.logits, atol=1e-5)
        for ma, mb in zip(a.features, b.features):
            for fa, fb in zip(ma, mb):
                assert torch.allclose(fa, fb, atol=2e-2, rtol=1e-2)  # cached in float16


def test_cached_targets_hold_every_stage_when_asked(mini_dataset) -> None:
    ensemble = two_member_ensemble(mini_dataset)
    batches = BatchIterator(mini_dataset.train, mini_dataset, 64, seed=5, views=1)
    cached = CachedTargets(ensemble, batches, features="all", chunk=250, progress=False)
    n = len(mini_dataset.train)
    shapes = [[tuple(f.shape[2:]) for f in member] for member in cached.features]
    assert shapes[0] == [(16, 28, 28), (32, 14, 14), (64, 7, 7)]  # resnet8's three stages
    assert len(shapes[1]) == 7 and shapes[1][-1] == (160, 4, 4)  # mobilenetv2's seven
    assert cached.serves("all") and cached.serves("last") and cached.serves(None)
    assert not CachedTargets(ensemble, batches, features="last", progress=False).serves("all")
    batch = next(iter(batches.epoch(0)))
    live = LiveTargets(ensemble, "all")(batch)
    for ma, mb in zip(cached(batch).features, live.features):
        assert len(ma) == len(mb)
        for fa, fb in zip(ma, mb):
            assert torch.allclose(fa, fb, atol=2e-2, rtol=1e-2)
    per_image = sum(f[0, 0].numel() * 2 for member in cached.features for f in member) + 2 * 10 * 4
    assert cached.nbytes() == per_image * n
    assert CachedTargets.fits(ensemble, mini_dataset.input_shape, n, 1, "all", per_image * n / 1e9)
    assert not CachedTargets.fits(ensemble, mini_dataset.input_shape, n + 1, 1, "all", per_image * n / 1e9)


def test_ensemble_accuracy_uses_the_mean_of_probabilities(mini_dataset) -> None:
    ensemble = two_member_ensemble(mini_dataset)
    from nas_kd.training.train import predict

    logits = torch.stack([predict(t.model, mini_dataset.val, mini_dataset) for t in ensemble.members])
    expected = (F.softmax(logits, -1).mean(0).argmax(1) == mini_dataset.val.y).float().mean().item()
    assert ensemble.accuracy(mini_dataset.val, mini_dataset) == expected


def test_a_subset_iterator_reads_the_whole_split_cache(mini_dataset) -> None:
    ensemble = two_member_ensemble(mini_dataset)
    whole = BatchIterator(mini_dataset.train, mini_dataset, 64, seed=1, views=1, augment=False)
    cache = CachedTargets(ensemble, whole, features=None, progress=False)
    subset = torch.tensor([3, 17, 100, 250, 400, 401, 537])
    trials = BatchIterator(mini_dataset.train, mini_dataset, 4, seed=1, views=1, augment=False, indices=subset)
    assert cache.covers(subset)
    for batch in trials.epoch(0):
        assert set(batch.index.tolist()) <= set(subset.tolist())
        assert torch.allclose(cache(batch).logits, LiveTargets(ensemble, None)(batch).logits, atol=1e-5)
    only_subset = CachedTargets(ensemble, trials, features=None, progress=False)
    assert only_subset.logits.shape[2] == len(subset) and not only_subset.covers(whole.indices)
    with pytest.raises(RuntimeError, match="not cached"):
        only_subset(next(iter(whole.epoch(0))))


@pytest.mark.parametrize(("augment", "limit_gb", "pass_cache", "recipe", "expected"), [
    (False, 4.0, True, "ce=1,kl=1,hint=1", "cached"),  # the search's cache covers the whole split: reused
    (False, 1e-6, True, "ce=1,kl=1,hint=1", "cached"),  # reusing it costs no more memory
    (False, 4.0, False, "ce=1,kl=1,hint=1", "cached"),  # none given: built, it fits
    (False, 1e-6, False, "ce=1,kl=1,hint=1", "live"),  # none given and too big for the memory limit
    (True, 4.0, True, "ce=1,kl=1", "views"),  # augmented: the teachers' outputs for min(4, 3 epochs) views
    (True, 1e-6, True, "ce=1,kl=1", "live"),  # augmented, the views too big: fresh views, live teachers
    (False, 4.0, True, "ce=1", "none"),  # no teacher in the recipe
])
def test_retrain_targets(mini_dataset, augment: bool, limit_gb: float, pass_cache: bool, recipe: str,
                         expected: str) -> None:
    from nas_kd.core.config import DistillConfig, SearchConfig, TrainConfig, parse_distill
    from nas_kd.distill.student import RetrainRecipe, criterion_for, retrain_targets

    ensemble = two_member_ensemble(mini_dataset)
    cfg = SearchConfig(train=TrainConfig(augment=augment), target_cache_gb=limit_gb,
                       distill=DistillConfig(losses=parse_distill(recipe)))
    if expected == "views":
        criterion = criterion_for(build(teacher_spec("resnet8"), mini_dataset.input_shape, 10), cfg.distill,
                                  ensemble.feature_channels)
        batches, source = retrain_targets(ensemble, mini_dataset, RetrainRecipe.of(cfg), criterion, None, progress=False)
        assert isinstance(source, CachedTargets) and source.views == batches.views == 3
        return
    criterion = criterion_for(build(teacher_spec("resnet8"), mini_dataset.input_shape, 10), cfg.distill,
                              ensemble.feature_channels)
    whole = BatchIterator(mini_dataset.train, mini_dataset, 128, cfg.seed, views=1, augment=False)
    search_cache = CachedTargets(ensemble, whole, criterion.features, progress=False)
    batches, source = retrain_targets(ensemble, mini_dataset, RetrainRecipe.of(cfg), criterion,
                                      search_cache if pass_cache else None, progress=False)
    kind = "none" if source is None else "cached" if isinstance(source, CachedTargets) else "live"
    assert kind == expected
    assert (source is search_cache) == (kind == "cached" and pass_cache)
    assert batches.views == (1 if kind == "cached" else None)


@pytest.mark.parametrize(("final_augment", "epochs"), [("auto", 3), ("auto", 7), ("auto", 8), ("auto", 24),
                                                    ("on", 3), ("off", 24)])
def test_the_long_retrain_recipe_augments_the_batches_it_says(mini_dataset, final_augment: str, epochs: int) -> None:
    """Checked on the batches: a retrain of `epochs` shows the images as they are in its first epoch
    and, when it augments, shifted or flipped views from the second on, with the teachers' outputs
    cached for exactly the views it shows."""
    from nas_kd.core.config import SearchConfig
    from nas_kd.distill.student import LONG_RETRAIN_EPOCHS, RetrainRecipe, criterion_for, retrain_targets

    long = LONG_RETRAIN_EPOCHS is not None and epochs >= LONG_RETRAIN_EPOCHS
    augmented = final_augment == "on" or (final_augment == "auto" and long)
    ensemble = two_member_ensemble(mini_dataset)
    cfg = SearchConfig(final_augment=final_augment, final_epochs=epochs)
    recipe = RetrainRecipe.of(cfg)
    assert recipe.epochs == epochs and recipe.augments() == recipe.augments(epochs) == augmented
    assert ("padding-crop and flips" in recipe.describe()) == augmented
    criterion = criterion_for(build(teacher_spec("resnet8"), mini_dataset.input_shape, 10), cfg.distill,
                              ensemble.feature_channels)
    batches, targets = retrain_targets(ensemble, mini_dataset, recipe, criterion, None, progress=False)
    # 3 views: 4 of the mini split would fit, but no more than min(--ensemble-views 4, epochs)
    assert isinstance(targets, CachedTargets) and targets.views == batches.views == (min(4, epochs) if augmented else 1)
    plain = BatchIterator(mini_dataset.train, mini_dataset, 128, cfg.seed, views=1, augment=False)
    for epoch in range(min(epochs, 3)):
        batch = next(iter(batches.epoch(epoch)))
        as_is = plain.images(batch.index, 0)
        assert torch.equal(batch.x, as_is) == (epoch == 0 or not augmented), epoch
        # the cached targets are the teachers' outputs on the very pixels of this batch
        live = ensemble(batch.x, criterion.features)
        assert torch.allclose(targets(batch).logits, live.logits, atol=1e-4)


def test_a_bad_final_augment_is_named() -> None:
    from nas_kd.core.config import SearchConfig
    from nas_kd.distill.student import RetrainRecipe

    with pytest.raises(InputError, match="final_augment must be one of auto, on, off, got 'maybe'"):
        RetrainRecipe.of(SearchConfig(final_augment="maybe")).augments(3)


def test_the_search_refuses_a_bad_final_augment_before_any_work() -> None:
    from nas_kd.core.config import SearchConfig
    from nas_kd.pipeline.checks import validate

    with pytest.raises(InputError, match="final_augment must be one of auto, on, off, got 'maybe'"):
        validate(SearchConfig(flops_budget=5_000_000, final_augment="maybe"))
