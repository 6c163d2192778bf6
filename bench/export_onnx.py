"""MiniLM and a Fashion-MNIST CNN exported to ONNX and run by ONNX Runtime, next to lowbit in
PyTorch and float PyTorch.

For each recipe (int8-dynamic, w8-weight, w4-g128): latency at batch 1 x 32 and 16 x 128 tokens
(real WikiText-2 sentences padded to that length) of the ONNX file in onnxruntime (CPU) and of
the same lowbit checkpoint in PyTorch eager; quality = mean cosine of sentence embeddings to the
fp32 PyTorch model on WikiText-2 test sentences, and to lowbit's own output ("cos_vs_lowbit").
Baselines: fp32 PyTorch eager and the fp32 model exported to ONNX. int8-dynamic is also written
with ``dynamic="ort"`` (ONNX Runtime's fused per-tensor DynamicQuantizeLinear), and w8-weight is
also timed in ONNX Runtime's default session, which fuses DequantizeLinear + MatMul into
MatMulNBits with int8-quantized activations (``session.qdq_matmulnbits_accuracy_level`` 4).

    .venv/bin/python bench/export_onnx.py [--quick] [--out bench/results/export_onnx.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import onnxruntime
import torch

import lowbit
from lowbit import data
from lowbit.data import encoder_batches
from lowbit.evaluation.embedding import sentence_embeddings
from lowbit.evaluation.latency import latency
from lowbit.export.onnx import export, session

RECIPES = ("int8-dynamic", "w8-weight", "w4-g128")
SHAPES = ((1, 32), (16, 128))


def _inputs(tokenizer, texts: list[str], batch: int, length: int) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts[:batch], padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _ort_embeddings(sess, tokenizer, texts: list[str]) -> torch.Tensor:
    rows = []
    for batch in encoder_batches(tokenizer, texts, 32, 128):
        feeds = {k: batch[k].numpy() for k in ("input_ids", "attention_mask")}
        hidden = torch.from_numpy(sess.run(None, feeds)[0])
        mask = batch["attention_mask"].unsqueeze(-1).float()
        rows.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0), dim=-1))
    return torch.cat(rows)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a * b).sum(-1).mean()), 5)


def _float_onnx(model, inputs: dict, path: Path) -> None:
    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    axes = {k: {0: "batch", 1: "sequence"} for k in ("input_ids", "attention_mask", "last_hidden_state")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Wrap().eval(),
            (inputs["input_ids"], inputs["attention_mask"]),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
        )
    model.eval()


def run(sentences: int, seconds: float) -> dict:
    texts = data.sentences(count=sentences)
    long_texts = data.sentences(count=16, min_words=40, max_words=120, seed=3)
    base = lowbit.load_model("builtin:minilm")
    tok = base.tokenizer
    inputs = {(b, n): _inputs(tok, long_texts if n > 64 else texts, b, n) for b, n in SHAPES}
    reference = sentence_embeddings(base.model, tok, texts)

    def timed(fn_for) -> dict:
        out = {}
        for b, n in SHAPES:
            fn = fn_for(inputs[(b, n)])
            out[f"ms_{b}x{n}"] = round(latency(fn, warmup=3, repeat=10, min_seconds=seconds)["median_ms"], 3)
        return out

    def torch_fn(model):
        return lambda feeds: lambda: model(**feeds)

    def ort_fn(sess):
        return lambda feeds: lambda: sess.run(None, {k: v.numpy() for k, v in feeds.items()})

    rows = [{"label": "fp32 torch eager", **timed(torch_fn(base.model)), "cos_vs_fp32": 1.0}]
    work = Path(tempfile.mkdtemp(prefix="lowbit-onnx-bench-"))
    _float_onnx(base.model, inputs[SHAPES[0]], work / "fp32.onnx")
    sess = session(work / "fp32.onnx")
    rows.append(
        {
            "label": "fp32 onnxruntime",
            **timed(ort_fn(sess)),
            "cos_vs_fp32": _cos(_ort_embeddings(sess, tok, texts), reference),
        }
    )
    for recipe in RECIPES:
        loaded = lowbit.load_model("builtin:minilm")
        lowbit.quantize(loaded, recipe)
        ckpt = lowbit.save(loaded, work / recipe)
        ours = sentence_embeddings(loaded.model, tok, texts)
        rows.append(
            {
                "label": f"{recipe} lowbit torch eager",
                **timed(torch_fn(loaded.model)),
                "cos_vs_fp32": _cos(ours, reference),
            }
        )
        variants = [("token", True)] + ([("ort", True)] if recipe == "int8-dynamic" else [])
        variants += [("token", False)] if recipe == "w8-weight" else []
        for dynamic, exact in variants:
            path = work / f"{recipe}-{dynamic}.onnx"
            info = export(ckpt, path, dynamic=dynamic)
            sess = session(path, exact=exact)
            emb = _ort_embeddings(sess, tok, texts)
            label = (
                f"{recipe} onnxruntime"
                + (" dynamic=ort" if dynamic == "ort" else "")
                + ("" if exact else " (default session)")
            )
            row = {"label": label, **timed(ort_fn(sess)), "cos_vs_fp32": _cos(emb, reference)}
            row.update(
                cos_vs_lowbit=_cos(emb, ours), layers=info["layers"], onnx_mb=round(info["size_bytes"] / 2**20, 1)
            )
            rows.append(row)
    fp32 = rows[0]
    for row in rows:
        for b, n in SHAPES:
            row[f"speedup_{b}x{n}"] = round(fp32[f"ms_{b}x{n}"] / row[f"ms_{b}x{n}"], 2)
    return {"model": "builtin:minilm", "sentences": len(texts), "rows": rows}


def fashion(seconds: float, epochs: int) -> dict:
    """The Fashion-MNIST CNN of bench/qat.py (trained here): per recipe, test accuracy and
    latency of lowbit in PyTorch and of its ONNX export in ONNX Runtime, and how far the two
    outputs are apart (largest logit difference relative to the largest logit, top-1 agreement)."""
    import copy
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from lowbit.qat import fit
    from qat import small_cnn

    def normalise(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - 0.2860) / 0.3530

    train, test = data.fashion_mnist("train"), data.fashion_mnist("test")
    x_train, x_test = normalise(train.images), normalise(test.images)
    batches = [x_train[i : i + 128] for i in range(0, len(x_train), 128)]
    labels = {id(b): train.labels[i : i + 128] for b, i in zip(batches, range(0, len(x_train), 128))}
    torch.manual_seed(0)
    model = small_cnn()
    fit(model, batches, targets=lambda b: labels[id(b)], epochs=epochs, lr=2e-3, seed=0)
    model.eval()
    shapes = {"1": x_test[:1], "256": x_test[:256]}

    def logits(fn) -> torch.Tensor:
        return torch.cat([fn(x_test[i : i + 500]) for i in range(0, len(x_test), 500)])

    def timed(fn) -> dict:
        return {
            f"ms_batch{k}": round(latency(lambda x=x: fn(x), warmup=3, repeat=10, min_seconds=seconds)["median_ms"], 3)
            for k, x in shapes.items()
        }

    def torch_run(m):
        def run(x):
            with torch.inference_mode():
                return m(x)

        return run

    def ort_run(sess):
        return lambda x: torch.from_numpy(sess.run(None, {"pixel_values": x.numpy()})[0])

    def accuracy(out: torch.Tensor) -> float:
        return round(float((out.argmax(-1) == test.labels).float().mean()), 4)

    ref = logits(torch_run(model))
    rows = [{"label": "fp32 torch eager", **timed(torch_run(model)), "test_accuracy": accuracy(ref)}]
    work = Path(tempfile.mkdtemp(prefix="lowbit-onnx-cnn-"))
    for recipe in ("w8-weight", "w8a8-static"):
        q = copy.deepcopy(model)
        lowbit.quantize(q, recipe, calib=batches[:16])
        ckpt = lowbit.save(q, work / recipe)
        ours = logits(torch_run(q))
        rows.append({"label": f"{recipe} lowbit torch eager", **timed(torch_run(q)), "test_accuracy": accuracy(ours)})
        info = export(ckpt, work / f"{recipe}.onnx", module=small_cnn().eval(), example=x_test[:2])
        sess = session(work / f"{recipe}.onnx")
        theirs = logits(ort_run(sess))
        rows.append(
            {
                "label": f"{recipe} onnxruntime",
                **timed(ort_run(sess)),
                "test_accuracy": accuracy(theirs),
                "max_rel_diff_vs_lowbit": round(float((theirs - ours).abs().max() / ours.abs().max()), 6),
                "top1_agreement_vs_lowbit": round(float((theirs.argmax(-1) == ours.argmax(-1)).float().mean()), 4),
                "layers": info["layers"],
            }
        )
    for row in rows:
        for k in shapes:
            row[f"speedup_batch{k}"] = round(rows[0][f"ms_batch{k}"] / row[f"ms_batch{k}"], 2)
    return {
        "model": "small CNN (bench/qat.py), Fashion-MNIST",
        "train_epochs": epochs,
        "test_images": len(x_test),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sentences, shorter timings")
    parser.add_argument("--skip", nargs="*", default=[], choices=["minilm", "fashion"])
    parser.add_argument("--out", type=Path, help="also write the JSON here (e.g. bench/results/export_onnx.json)")
    args = parser.parse_args()
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    if "minilm" not in args.skip:
        result["minilm"] = run(100 if args.quick else 500, 0.5 if args.quick else 2.0)
    if "fashion" not in args.skip:
        result["fashion_mnist"] = fashion(0.5 if args.quick else 2.0, 1 if args.quick else 2)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
