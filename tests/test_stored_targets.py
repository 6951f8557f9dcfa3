"""The ensemble's targets kept on disk: a second run reads them, a damaged file heals, and any change
of the data or the teachers misses."""

from __future__ import annotations

from pathlib import Path

import torch

from nas_kd.data.batches import BatchIterator
from nas_kd.nets.arch import build
from nas_kd.nets.cost import count
from nas_kd.nets.weights import weights_digest
from nas_kd.nets.zoo import teacher_spec
from nas_kd.teaching.cache import Teacher
from nas_kd.teaching.ensemble import Ensemble
from nas_kd.teaching.stored import stored_targets


def ensemble(dataset, seed: int) -> Ensemble:
    torch.manual_seed(seed)
    model = build(teacher_spec("resnet8"), dataset.input_shape, dataset.num_classes).eval()
    return Ensemble([Teacher("resnet8", model, count(model, dataset.input_shape), 0.5, "test",
                             digest=weights_digest(model.state_dict()))])


def test_targets_are_stored_read_healed_and_missed(mini_dataset, tmp_path: Path) -> None:
    lines: list[str] = []
    folder, teachers = tmp_path / "targets", ensemble(mini_dataset, 0)
    batches = BatchIterator(mini_dataset.train, mini_dataset, 64, 0, views=2, augment=True,
                            indices=torch.arange(100))
    first, how = stored_targets(teachers, mini_dataset, batches, "last", folder, lines.append, False)
    assert how == "computed and stored" and [p.suffix for p in folder.iterdir()] == [".safetensors"]  # no tmp left
    second, how = stored_targets(teachers, mini_dataset, batches, "last", folder, lines.append, False)
    assert how == "stored" and torch.equal(first.logits, second.logits)
    assert all(torch.equal(a, b) for m, n in zip(first.features, second.features) for a, b in zip(m, n))
    batch = next(iter(batches.epoch(1)))
    assert torch.equal(first(batch).logits, second(batch).logits)  # served alike, by (view, position)

    [path] = folder.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:200])  # a damaged file heals: moved aside, computed again
    healed, how = stored_targets(teachers, mini_dataset, batches, "last", folder, lines.append, False)
    assert how == "computed and stored" and torch.equal(healed.logits, first.logits)
    assert len(lines) == 1 and lines[0].startswith("warning: stored ensemble targets") and "moved them to" in lines[0]
    assert list((folder / "broken").iterdir())

    other_images = BatchIterator(mini_dataset.train, mini_dataset, 64, 0, views=2, augment=True,
                                 indices=torch.arange(100, 200))
    assert stored_targets(teachers, mini_dataset, other_images, "last", folder, lines.append, False)[1] != "stored"
    other_teacher = ensemble(mini_dataset, 1)
    assert stored_targets(other_teacher, mini_dataset, batches, "last", folder, lines.append, False)[1] != "stored"
    assert stored_targets(teachers, mini_dataset, batches, None, folder, lines.append, False)[1] != "stored"
    assert len(list(folder.glob("*.safetensors"))) == 4
