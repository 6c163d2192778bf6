"""QAT vs PTQ on real data; prints one JSON object.

1. A small CNN trained on Fashion-MNIST (Debian dataset-fashion-mnist): float accuracy (also after the
   same extra epochs QAT gets, the fair reference for QAT), then
   PTQ and QAT at w8a8, w4a8, w2a8, ternary-a8 and binary-a8 (the first conv and the last
   Linear stay 8-bit, as is customary; activations are static per-tensor uint8).
2. MiniLM w4a8 recovered by distillation (MSE on the last hidden state) on WikiText-2 valid
   sentences; embedding fidelity on WikiText-2 test sentences, PTQ vs QAT.
3. Reproducibility: one QAT run repeated with the same seed.

    .venv/bin/python bench/qat.py > results/qat.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from torch import nn

import lowbit
from lowbit import data
from lowbit.evaluation.embedding import nearest_neighbours, sentence_embeddings
from lowbit.qat import convert, fit, prepare_qat
from lowbit.recipe import Recipe

STATIC = {"mode": "static", "format": "int8-asym"}
SCHEMES = {
    "w8a8": {"format": "int8", "granularity": "channel"},
    "w4a8": {"format": "int4", "granularity": "channel"},
    "w2a8": {"format": "int2-asym", "granularity": "channel"},
    "ternary-a8": {"format": "ternary", "granularity": "channel"},
    "binary-a8": {"format": "binary", "granularity": "channel"},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def small_cnn() -> nn.Sequential:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32),
        *block(32, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        *block(64, 64),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def cnn_recipe(weight: dict) -> Recipe:
    eight = {"format": "int8", "granularity": "channel"}
    return Recipe.from_dict(
        {
            "name": "cnn",
            "include_head": True,
            "rules": [
                {"match": "0", "weight": eight, "activation": STATIC},  # first conv
                {"match": "17", "weight": eight, "activation": STATIC},  # last Linear
                {"weight": weight, "activation": STATIC},
            ],
        }
    )


class Batches:
    """Normalised Fashion-MNIST minibatches with their labels."""

    def __init__(self, split: str, batch: int, limit: int | None = None) -> None:
        ds = data.fashion_mnist(split)
        x = (ds.images.float() / 255.0 - 0.2860) / 0.3530
        n = len(x) if limit is None else min(limit, len(x))
        self.x, self.y = x[:n], ds.labels[:n]
        self.batches = [self.x[i : i + batch] for i in range(0, n, batch)]
        self.labels = {id(b): self.y[i : i + batch] for b, i in zip(self.batches, range(0, n, batch))}

    def target(self, b: torch.Tensor) -> torch.Tensor:
        return self.labels[id(b)]


def accuracy(model: nn.Module, test: Batches) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(b).argmax(-1) == test.target(b)).sum()) for b in test.batches)
    return hits / len(test.y)


def fashion(args) -> dict:
    train, test = Batches("train", 128), Batches("test", 500)
    torch.manual_seed(0)
    model = small_cnn()
    start = time.perf_counter()
    fit(model, train.batches, targets=train.target, epochs=args.epochs, lr=2e-3, seed=0)
    float_acc = accuracy(model, test)
    log(f"fashion-mnist float {float_acc:.4f} ({time.perf_counter() - start:.0f} s)")
    # The fair float reference for QAT: the same extra epochs at the same learning rate, no quantization.
    longer = copy.deepcopy(model)
    fit(longer, train.batches, targets=train.target, epochs=args.qat_epochs, lr=args.qat_lr, seed=1)
    longer_acc = accuracy(longer, test)
    log(f"fashion-mnist float + {args.qat_epochs} epochs {longer_acc:.4f}")
    rows = []
    for name, weight in SCHEMES.items():
        recipe = cnn_recipe(weight)
        ptq = copy.deepcopy(model)
        lowbit.quantize(ptq, recipe, calib=train.batches[:16])
        ptq_acc = accuracy(ptq, test)
        qat = copy.deepcopy(model)
        start = time.perf_counter()
        prepare_qat(qat, recipe, warmup=50, example=train.batches[0])
        fit(qat, train.batches, targets=train.target, epochs=args.qat_epochs, lr=args.qat_lr, seed=1)
        convert(qat)
        qat_acc = accuracy(qat, test)
        rows.append(
            {
                "scheme": name,
                "ptq_accuracy": ptq_acc,
                "qat_accuracy": qat_acc,
                "qat_seconds": time.perf_counter() - start,
            }
        )
        log(f"{name}: PTQ {ptq_acc:.4f}  QAT {qat_acc:.4f}")
    repeat = []
    for _ in range(2):
        qat = copy.deepcopy(model)
        prepare_qat(qat, cnn_recipe(SCHEMES["w4a8"]), warmup=50, example=train.batches[0])
        fit(qat, train.batches[:100], targets=train.target, epochs=1, lr=args.qat_lr, seed=7)
        repeat.append(accuracy(convert(qat), test))
    return {
        "float_accuracy": float_acc,
        "float_accuracy_same_epochs_as_qat": longer_acc,
        "train_epochs": args.epochs,
        "qat_epochs": args.qat_epochs,
        "first_last_layers": "int8 weights, uint8 static activations",
        "rows": rows,
        "reproducibility": {"accuracies": repeat, "identical": repeat[0] == repeat[1]},
    }


def fidelity(model, tok, sentences, ref_emb, ref_nn) -> dict:
    emb = sentence_embeddings(model, tok, sentences)
    return {
        "mean_cosine": float((emb * ref_emb).sum(dim=1).mean()),
        "top1_agreement": float((nearest_neighbours(emb) == ref_nn).float().mean()),
    }


def minilm(args) -> dict:
    teacher = lowbit.load_model("builtin:minilm")
    tok = teacher.tokenizer
    held_out = data.sentences(count=500)
    train_text = data.sentences(data.wikitext("valid"), count=args.minilm_sentences)
    batches = data.encoder_batches(tok, train_text, batch_size=16, max_length=128)
    ref_emb = sentence_embeddings(teacher.model, tok, held_out)
    ref_nn = nearest_neighbours(ref_emb)
    recipe = args.minilm_recipe
    ptq = lowbit.load_model("builtin:minilm")
    lowbit.quantize(ptq, recipe)
    ptq_fid = fidelity(ptq.model, tok, held_out, ref_emb, ref_nn)
    student = lowbit.load_model("builtin:minilm")
    prepare_qat(student, recipe)
    start = time.perf_counter()
    losses = fit(
        student.model, batches, teacher=teacher.model, loss="mse", epochs=args.minilm_epochs, lr=args.minilm_lr, seed=0
    )
    convert(student)
    qat_fid = fidelity(student.model, tok, held_out, ref_emb, ref_nn)
    log(f"minilm {recipe}: PTQ {ptq_fid}  QAT {qat_fid}")
    return {
        "recipe": recipe,
        "train_sentences": len(train_text),
        "held_out_sentences": len(held_out),
        "epochs": args.minilm_epochs,
        "steps": len(losses),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "ptq": ptq_fid,
        "qat": qat_fid,
        "qat_seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--qat-lr", type=float, default=5e-4)
    parser.add_argument("--minilm-recipe", default="w4a8")
    parser.add_argument("--minilm-sentences", type=int, default=2000)
    parser.add_argument("--minilm-epochs", type=int, default=2)
    parser.add_argument("--minilm-lr", type=float, default=2e-5)
    parser.add_argument("--skip", nargs="*", default=[], choices=["fashion", "minilm"])
    args = parser.parse_args()
    out = {"torch_threads": torch.get_num_threads()}
    if "fashion" not in args.skip:
        out["fashion_mnist"] = fashion(args)
    if "minilm" not in args.skip:
        out["minilm"] = minilm(args)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
