"""Classification: accuracy, top-1 agreement and top-5 overlap on hand-built logits; real digits and photos."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import DataError, ModelError
from lowbit.evaluation.classification import classify


class Fixed(torch.nn.Module):
    """Logits are the first ``classes`` pixels of each image: predictions chosen by the test."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, : self.classes].float()


def images_with_logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows).reshape(len(rows), 1, 1, -1)


def test_accuracy_and_agreement_by_hand():
    ours = images_with_logits([[9, 1, 2, 3, 4, 5], [0, 9, 1, 2, 3, 4], [5, 4, 3, 2, 1, 9]])
    labels = torch.tensor([0, 1, 0])
    got = classify(Fixed(6), ours, labels=labels)
    assert got["accuracy"] == pytest.approx(2 / 3) and got["images"] == 3 and "predictions" not in got

    class Shifted(Fixed):  # reference: same images, logits rolled by one class
        def forward(self, x):
            return super().forward(x).roll(1, dims=1)

    got = classify(Fixed(6), ours, labels=labels, reference=Shifted(6))
    # ours top-1: 0, 1, 5; reference top-1: 1, 2, 0 -> no agreement
    assert got["top1_agreement"] == 0.0
    # top-5 sets: image 0 ours {0,5,4,3,2}, ref {1,0,5,4,3} -> 4 shared; image 1 ours {1,5,4,3,2}, ref
    # {2,0,5,4,3} -> 4; image 2 ours {5,0,1,2,3}, ref {0,1,2,3,4} -> 4
    assert got["top5_overlap"] == pytest.approx(4 / 5)
    assert got["reference_accuracy"] == pytest.approx(1 / 3)
    same = classify(Fixed(6), ours, reference=Fixed(6))
    assert same["top1_agreement"] == 1.0 and same["top5_overlap"] == 1.0


def test_predictions_without_labels_or_reference():
    got = classify(Fixed(3), images_with_logits([[0, 0, 1], [1, 0, 0]]))
    assert got["predictions"] == [2, 0]


def test_batches_and_preprocess():
    images = torch.rand(10, 3, 4, 4)
    whole = classify(Fixed(5), images, reference=Fixed(5), batch_size=32)
    split = classify(Fixed(5), images, reference=Fixed(5), batch_size=3)
    assert whole["top1_agreement"] == split["top1_agreement"] == 1.0

    def mark_class_0(x):
        out = torch.zeros_like(x)
        out[:, 0, 0, 0] = 1.0
        return out

    assert classify(Fixed(5), images, labels=torch.zeros(10), preprocess=mark_class_0)["accuracy"] == 1.0


def test_list_of_sizes_needs_a_resizing_preprocess():
    photos = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in [(8, 8), (10, 6)]]

    def resize(x):
        return torch.nn.functional.interpolate(x.float(), size=(4, 4))

    assert classify(Fixed(5), photos, preprocess=resize)["images"] == 2
    with pytest.raises(DataError, match=r"different sizes.*pass a preprocess"):
        classify(Fixed(5), photos)


def test_errors():
    images = torch.rand(4, 1, 2, 2)
    with pytest.raises(DataError, match="3 labels for 4 images"):
        classify(Fixed(4), images, labels=torch.zeros(3))
    with pytest.raises(DataError, match="no images"):
        classify(Fixed(4), torch.rand(0, 1, 2, 2))
    with pytest.raises(ModelError, match="expected logits"):
        classify(torch.nn.Identity(), images)
    with pytest.raises(ModelError, match="same classes"):
        classify(Fixed(4), images, reference=Fixed(3))


def test_trained_linear_model_on_digits():
    from lowbit.data import images

    digits = images("digits")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    train = slice(0, 1200)
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(digits.images[train]), digits.labels[train]).backward()
        optimizer.step()
    got = classify(model.eval(), digits.images[1200:], labels=digits.labels[1200:])
    assert got["accuracy"] > 0.9 and got["images"] == 597


@pytest.mark.slow
def test_efficientnet_predictions_on_photos():
    from lowbit.data import images
    from lowbit.models import load_model

    loaded = load_model("builtin:efficientnet-lite0")
    photos = images("photos")
    predictions = classify(loaded.model, photos.images, preprocess=loaded.preprocess)["predictions"]
    assert predictions[photos.names.index("coffee")] == 967  # ImageNet class 967: espresso
    assert predictions[photos.names.index("chelsea")] in range(281, 286)  # a domestic cat class
