"""ONNX export: onnxruntime runs the exported file with lowbit's outputs (same checkpoint, lowbit's
reference kernels in torch), integer codes stay integers (QDQ / MatMulInteger / MatMulNBits),
formats without an ONNX grid are listed as dequantized, and bad input is refused cleanly."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.errors import CheckpointError, SpecError, UnsupportedError
from lowbit.export import onnx as onnx_export
from lowbit.export.onnx import export, session
from lowbit.models import Loaded

# Weight-only layers carry the exact codes and scales: float32 rounding only. Quantized
# activations: one rounding flip in a code moves an output by a quantization step, so those
# are compared relative to the output's size.
TOL = {
    "w8-weight": 1e-5,
    "w4-g128": 1e-5,
    "nf4-g64": 1e-5,
    "int8-dynamic-rtn": 2e-2,
    "smoothquant-0.5": 2e-2,  # int8-dynamic with a fixed alpha (no search): input_smooth divisors in the graph
    "w8a8-static": 2e-2,
    "w3-g128-hqq": 1e-5,  # 3-bit codes widened to 4
    "w3-g128-hqq-float": 1e-5,  # HQQ's fractional (float) zero points
    "w4-g128-2of4": 1e-5,  # pruned weights written as the code of 0
    "w4a8": 2e-2,  # MatMulNBits after per-token activation quantization
}


def tiny_bert() -> Loaded:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,  # in features 64 (one partial group of 128) and 256 (two groups)
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    meta = {"type": "hf", "auto_class": "AutoModel", "kind": "encoder"}
    return Loaded(BertModel(cfg).eval(), "encoder", "tiny-bert", meta=meta)


VARIANTS = {
    "smoothquant-0.5": ("int8-dynamic", {"alpha": 0.5}),
    "w3-g128-hqq-float": ("w3-g128-hqq", {"zero": "float"}),
}


def _recipe(name: str):
    if name not in VARIANTS:
        return name
    from lowbit.presets import get_preset
    from lowbit.recipe import Recipe

    preset, options = VARIANTS[name]
    data = get_preset(preset).to_dict()
    data["name"], data["rules"][0]["options"] = name, options
    return Recipe.from_dict(data)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-ckpt")
    calib = [
        {"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i))} for i in range(3)
    ]
    out = {}
    for recipe in TOL:
        loaded = tiny_bert()
        lowbit.quantize(loaded, _recipe(recipe), calib=calib)
        out[recipe] = lowbit.save(loaded, root / recipe)
    return out


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("recipe", list(TOL))
def test_onnxruntime_matches_lowbit(checkpoints, tmp_path, monkeypatch, recipe):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")  # lowbit's exact arithmetic (fast kernels use bf16)
    out = tmp_path / "m.onnx"
    info = export(checkpoints[recipe], out)
    assert info["inputs"] == ["input_ids", "attention_mask"] and info["outputs"] == ["last_hidden_state"]
    ids = torch.randint(0, 100, (3, 11))  # not the traced shape: batch and sequence are dynamic
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    with torch.no_grad():
        ours = lowbit.load(checkpoints[recipe]).model(input_ids=ids, attention_mask=mask).last_hidden_state
    theirs = session(out).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    err = (torch.from_numpy(theirs) - ours).abs().max().item()
    assert err < TOL[recipe] * max(1.0, ours.abs().max().item()), err
    assert info["max_abs_diff"] < TOL[recipe] * max(1.0, info["reference_max_abs"])


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_outlier_channels_run_as_a_float_side_matmul(tmp_path, monkeypatch):
    """LLM.int8-style layers: outlier input channels bypass quantization (kernels.run's split)."""
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    torch.manual_seed(0)
    model = _mlp().eval()
    float_weight = model[0].weight.detach().clone()
    lowbit.quantize(model, "int8-dynamic-rtn")
    index = torch.tensor([3, 11])
    model[0].set_outliers(index, float_weight[:, index])
    ckpt = lowbit.save(model, tmp_path / "mlp")
    x = torch.randn(6, 16)
    x[:, 3] *= 40.0  # an outlier channel
    info = export(ckpt, tmp_path / "mlp.onnx", module=_mlp(), example=torch.randn(2, 16))
    assert info["inputs"] == ["input_0"] and info["layers"] == {"int8-matmulinteger": 1}
    with torch.no_grad():
        ours = model(x)
    theirs = torch.from_numpy(session(tmp_path / "mlp.onnx").run(None, {"input_0": x.numpy()})[0])
    assert (theirs - ours).abs().max().item() < 1e-4 * max(1.0, ours.abs().max().item())


def test_graphs_hold_the_integer_codes(checkpoints, tmp_path):
    layers = {}
    for recipe in ("w8-weight", "w4-g128", "int8-dynamic-rtn", "w8a8-static"):
        info = export(checkpoints[recipe], tmp_path / f"{recipe}.onnx", check=False)
        layers[recipe] = (info["layers"], _ops(tmp_path / f"{recipe}.onnx"))
    # the weight-only presets also hold the 3 embedding tables (int8 rows, gathered then scaled) and
    # the pooler (the output head: int8 per channel)
    weights, ops = layers["w8-weight"]
    assert weights == {"int8-qdq": 13, "int8-gather": 3}
    assert ops.count("DequantizeLinear") == 12  # the pooler does not feed last_hidden_state: pruned
    weights, ops = layers["w4-g128"]
    assert weights == {"matmulnbits-4": 12, "int8-qdq": 1, "int8-gather": 3} and ops.count("MatMulNBits") == 12
    table = next(i for i in onnx.load(str(tmp_path / "w4-g128.onnx")).graph.initializer if list(i.dims) == [100, 64])
    assert table.data_type == onnx.TensorProto.INT8  # the word embeddings: one byte per weight
    weights, ops = layers["int8-dynamic-rtn"]
    assert weights == {"int8-matmulinteger": 12} and ops.count("MatMulInteger") == 12
    weights, ops = layers["w8a8-static"]
    assert ops.count("QuantizeLinear") == 12 and ops.count("DequantizeLinear") == 24
    model = onnx.load(str(tmp_path / "w8-weight.onnx"))
    init = {t.name: t for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert init[dq.input[0]].data_type == onnx.TensorProto.INT8  # the codes, not floats


def test_w4_codes_and_scales_are_copied_exactly(checkpoints):
    """MatMulNBits' packed blob decodes to lowbit's own integers (no re-quantization)."""
    from lowbit.export.onnx_layers import nbits_weight
    from lowbit.export.onnx_ops import unpack_nbits

    layer = lowbit.load(checkpoints["w4-g128"]).model.encoder.layer[0].intermediate.dense
    qt = layer.qweight
    blob, scales, zeros, bits, block = nbits_weight(qt)
    assert (bits, block) == (4, 128)
    assert torch.equal(unpack_nbits(blob.reshape(blob.shape[0], -1), 4, qt.shape[1]).to(torch.uint8), qt.codes())
    assert torch.equal(scales.reshape(qt.scale.shape), qt.scale.float())
    assert torch.equal(
        unpack_nbits(zeros.reshape(qt.shape[0], -1), 4, 1).to(torch.uint8).reshape(-1), qt.zero_point.reshape(-1)
    )


def test_formats_without_a_grid_are_listed(checkpoints, tmp_path):
    info = export(checkpoints["nf4-g64"], tmp_path / "nf4.onnx", check=False)
    assert info["layers"] == {"float": 12, "int8-qdq": 1, "int8-gather": 3} and len(info["dequantized"]) == 12
    assert "nf4 has no ONNX integer grid" in info["dequantized"][0]["why"]


def test_fp8_activations_are_listed_as_approximated(tmp_path):
    loaded = tiny_bert()
    lowbit.quantize(loaded, "fp8")
    info = export(lowbit.save(loaded, tmp_path / "fp8"), tmp_path / "fp8.onnx")
    assert info["layers"] == {"float": 12} and len(info["approximated"]) == 12
    assert "fp8_e4m3 activations have no ONNX grid" in info["approximated"][0]


def test_ort_dynamic_is_listed_as_approximated(checkpoints, tmp_path):
    info = export(checkpoints["int8-dynamic-rtn"], tmp_path / "ort.onnx", dynamic="ort")
    assert info["activations"] == {"dynamic-ort": 12} and "DynamicQuantizeLinear" in info["approximated"][0]
    assert "DynamicQuantizeLinear" in _ops(tmp_path / "ort.onnx")
    assert info["max_abs_diff"] < 0.1 * info["reference_max_abs"]


def test_causal_lm_exports_logits(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    meta = {"type": "hf", "auto_class": "AutoModelForCausalLM", "kind": "causal-lm"}
    loaded = Loaded(LlamaForCausalLM(cfg).eval(), "causal-lm", "tiny-llama", meta=meta)
    lowbit.quantize(loaded, "w4-g128")
    ckpt = lowbit.save(loaded, tmp_path / "llama")
    info = export(ckpt, tmp_path / "llama.onnx")
    assert info["outputs"] == ["logits"]
    assert info["layers"] == {"matmulnbits-4": 14, "int8-qdq": 1, "int8-gather": 1}  # int8 head and table
    ids = torch.randint(0, 96, (3, 13))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        ours = loaded.model(input_ids=ids, attention_mask=mask).logits
    theirs = session(tmp_path / "llama.onnx").run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert (torch.from_numpy(theirs) - ours).abs().max().item() < 1e-5


def test_hf_image_classifier_exports_from_its_config(tmp_path, monkeypatch):
    """A ViT (model code reads the patch convolution's ``.weight.dtype``) exports with an example
    made from config.json's image size; ONNX Runtime matches lowbit on other images."""
    from transformers import ViTConfig, ViTForImageClassification

    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    cfg = ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=96, num_labels=5,
    )  # fmt: skip
    torch.manual_seed(0)
    kind = "image-classifier"
    meta = {"type": "hf", "auto_class": "AutoModelForImageClassification", "kind": kind}
    loaded = Loaded(ViTForImageClassification(cfg).eval(), kind, "tiny-vit", meta=meta)
    lowbit.quantize(loaded, "w8-weight")
    info = export(lowbit.save(loaded, tmp_path / "vit"), tmp_path / "vit.onnx")
    assert info["inputs"] == ["pixel_values"] and info["max_abs_diff"] < 1e-4
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = loaded.model(pixel_values=x).logits
    theirs = session(tmp_path / "vit.onnx").run(None, {"pixel_values": x.numpy()})[0]
    assert (torch.from_numpy(theirs) - ours).abs().max().item() < 1e-4


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding="valid", bias=False)
        self.head = nn.Linear(16 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.flatten(1))


@pytest.mark.parametrize("recipe, tol, layers", [("w8-weight", 1e-5, 3), ("w8a8-static", 2e-2, 2)])
def test_cnn_conv_weights_are_int8_per_channel(tmp_path, monkeypatch, recipe, tol, layers):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    torch.manual_seed(0)
    model = TinyCNN().eval()
    lowbit.quantize(model, recipe, calib=[torch.randn(4, 1, 8, 8) for _ in range(3)])
    ckpt = lowbit.save(model, tmp_path / "cnn")
    x = torch.randn(5, 1, 8, 8)
    info = export(ckpt, tmp_path / "cnn.onnx", module=TinyCNN(), example=torch.randn(2, 1, 8, 8))
    assert info["inputs"] == ["pixel_values"] and info["layers"] == {"int8-qdq": layers}  # w8-weight: head too
    graph = onnx.load(str(tmp_path / "cnn.onnx")).graph
    dq = [
        n
        for n in graph.node
        if n.op_type == "DequantizeLinear" and "conv" in n.name and any(a.name == "axis" for a in n.attribute)
    ]
    assert dq and all(a.i == 0 for n in dq for a in n.attribute if a.name == "axis")
    with torch.no_grad():
        ours = model(x)
    theirs = torch.from_numpy(session(tmp_path / "cnn.onnx").run(None, {"pixel_values": x.numpy()})[0])
    assert (theirs - ours).abs().max().item() < tol * max(1.0, ours.abs().max().item())


def test_bad_input_is_refused(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        export(tmp_path, tmp_path / "x.onnx")
    with pytest.raises(SpecError, match="unknown option"):
        export(checkpoints["w8-weight"], tmp_path / "x.onnx", opset=21)
    with pytest.raises(SpecError, match="dynamic="):
        export(checkpoints["w8-weight"], tmp_path / "x.onnx", dynamic="per-row")
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in checkpoints["w8-weight"].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        export(broken, tmp_path / "x.onnx")
    model = _mlp()
    lowbit.quantize(model, "w8-weight")
    lowbit.save(model, tmp_path / "custom")
    with pytest.raises(CheckpointError, match="module="):
        export(tmp_path / "custom", tmp_path / "x.onnx")
    with pytest.raises(SpecError, match="example"):
        export(tmp_path / "custom", tmp_path / "x.onnx", module=_mlp())
    assert not any(p.suffix in (".onnx", ".tmp") for p in tmp_path.iterdir())


def test_unsupported_activations_are_refused(tmp_path):
    from lowbit.recipe import Recipe

    rule = {"types": ["Linear"], "weight": {"format": "int8"}, "activation": {"mode": "dynamic", "format": "int8-asym"}}
    asym = {"name": "a", "rules": [rule]}
    model = _mlp()
    lowbit.quantize(model, Recipe.from_dict(asym))
    lowbit.save(model, tmp_path / "asym")
    with pytest.raises(UnsupportedError, match="int8-dynamic"):
        export(tmp_path / "asym", tmp_path / "x.onnx", module=_mlp(), example=torch.randn(1, 16))


def test_failed_export_leaves_no_file(checkpoints, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise UnsupportedError("trace failed")

    monkeypatch.setattr(onnx_export, "_trace", boom)
    with pytest.raises(UnsupportedError):
        export(checkpoints["w8-weight"], tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_onnx(checkpoints, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    with pytest.raises(SystemExit) as exc:
        main(["export", str(checkpoints["w4-g128"]), "--format", "onnx", "--out", str(out), "--json"])
    assert exc.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert (
        data["format"] == "onnx"
        and data["layers"] == {"matmulnbits-4": 12, "int8-qdq": 1, "int8-gather": 3}
        and out.is_file()
    )
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path / "nope"), "--format", "onnx", "--out", str(tmp_path / "y.onnx")])
    assert exc.value.code == 2 and "checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["export", str(checkpoints["w4-g128"]), "--format", "onnx", "--out", str(out), "--option", "module=x"])
    assert exc.value.code == 2 and "module=" in capsys.readouterr().err


@pytest.mark.slow
# int8-dynamic-rtn: the int8-dynamic graph without SmoothQuant's calibration (minutes on MiniLM);
# the SmoothQuant divisors are covered on the tiny BERT above. Its floor is lower: ORT's float ops
# (LayerNorm, Erf, attention) differ from torch's by ulps, an activation code near a rounding tie
# flips, and per-token scales carry the flip on through the layers. On a Xeon with AMX the first
# flip came in layer 1's FFN (all codes before it equal), and by layer 5 codes differed by up to 17
# steps; min cosine 0.9978 (0.999+ on AMD Zen 4).
@pytest.mark.parametrize("recipe, floor", [("w4-g128", 0.99999), ("int8-dynamic-rtn", 0.995)])
def test_minilm_sentence_embeddings_match(tmp_path, monkeypatch, recipe, floor):
    """MiniLM: cosine of mean-pooled sentence embeddings, onnxruntime vs lowbit (reference kernels)."""
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    loaded = lowbit.load_model("builtin:minilm")
    lowbit.quantize(loaded, recipe)
    ckpt = lowbit.save(loaded, tmp_path / "q")
    export(ckpt, tmp_path / "m.onnx")
    sentences = ["The cat sat on the mat.", "Quantization shrinks networks.", "A fox jumps over the lazy dog.", "hi"]
    tok = loaded.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = loaded.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    feeds = {"input_ids": tok["input_ids"].numpy(), "attention_mask": tok["attention_mask"].numpy()}
    theirs = torch.from_numpy(session(tmp_path / "m.onnx").run(None, feeds)[0])
    mask = tok["attention_mask"].unsqueeze(-1).float()

    def embed(h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    assert (embed(ours) * embed(theirs)).sum(-1).min().item() >= floor


def test_grouped_embedding_tables_are_written_as_float_with_the_reason(tmp_path):
    loaded = tiny_bert()
    head = {"weight": {"format": "int4-asym", "granularity": "group:32"}}
    lowbit.quantize(loaded, lowbit.Recipe.from_dict({"base": "w4-g128", "head": head}))
    info = export(lowbit.save(loaded, tmp_path / "g"), tmp_path / "g.onnx")
    tables = [d for d in info["dequantized"] if d["layer"].startswith("embeddings.")]
    assert len(tables) == 3 and all("group:32 scales have no int8 Gather form" in d["why"] for d in tables)
