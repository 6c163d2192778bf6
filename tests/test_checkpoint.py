"""lowbit checkpoints: bit-identical round trips without float weights, atomic writes, bad files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import CheckpointError
from lowbit.models import Loaded
from lowbit.presets import get_preset


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Loaded(
        LlamaForCausalLM(cfg).eval(),
        "causal-lm",
        "tiny-llama",
        meta={"type": "hf", "auto_class": "AutoModelForCausalLM", "kind": "causal-lm"},
    )


def tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return Loaded(
        BertModel(cfg).eval(), "encoder", "tiny-bert", meta={"type": "hf", "auto_class": "AutoModel", "kind": "encoder"}
    )


@pytest.mark.parametrize(
    "recipe",
    ["w8-weight", "w4-g128", "int8-dynamic", "int8-dynamic-rtn", "nf4-g64", "vq-2bit", "ternary", "w8a8-static"],
)
def test_llama_round_trip_is_bit_identical(recipe, tmp_path):
    loaded = tiny_llama()
    ids = torch.randint(0, 96, (2, 11))
    calib = [{"input_ids": torch.randint(0, 96, (2, 16))} for _ in range(4)]
    lowbit.quantize(loaded, recipe, calib=calib)
    with torch.no_grad():
        before = loaded.model(ids).logits
    lowbit.save(loaded, tmp_path / "q")
    back = lowbit.load(tmp_path / "q")
    with torch.no_grad():
        after = back.model(ids).logits
    assert torch.equal(before, after)
    manifest = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    shares = get_preset(recipe).head is not None  # a quantized tied table: format 2 (older lowbit: "upgrade")
    assert manifest["format_version"] == (2 if shares else 1) and manifest["recipe"]["name"] == recipe
    head, embed = back.model.lm_head, back.model.model.embed_tokens
    if get_preset(recipe).head is None:
        assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
        assert head.weight is embed.weight or torch.equal(head.weight, embed.weight)
    else:  # the tied table quantized once (int8 per row), stored once, shared again after loading
        assert manifest["tied"] == {
            "lm_head.qdata": "model.embed_tokens.qdata",
            "lm_head.scale": "model.embed_tokens.scale",
        }
        assert head.qdata is embed.qdata and head.scale is embed.scale
        assert loaded.model.lm_head.qdata is loaded.model.model.embed_tokens.qdata


def test_tied_layers_share_only_identical_quantized_weights():
    """A tied head and embedding that come out different (the head by GPTQ, the table by
    round-to-nearest) keep their own tensors; identical ones share a single copy."""
    from lowbit.nn import same_weight

    loaded = tiny_llama()
    calib = [{"input_ids": torch.randint(0, 96, (2, 16))} for _ in range(4)]
    recipe = lowbit.Recipe.from_dict(
        {"base": "w4-g128", "rules": [{"match": "lm_head", "weight": "int8", "algorithm": "gptq"}]}
    )
    lowbit.quantize(loaded, recipe, calib=calib)
    head, embed = loaded.model.lm_head, loaded.model.model.embed_tokens
    assert head.qdata is not embed.qdata and not same_weight(head, embed)
    assert same_weight(embed, embed)


def test_static_bert_round_trip_and_load_model_dispatch(tmp_path):
    loaded = tiny_bert()
    batches = [{"input_ids": torch.randint(0, 100, (2, 9))} for _ in range(3)]
    lowbit.quantize(loaded, "w8a8-static", calib=batches)
    ids = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        before = loaded.model(input_ids=ids).last_hidden_state
    lowbit.save(loaded, tmp_path / "q")
    back = lowbit.load_model(str(tmp_path / "q"))  # a lowbit directory is a MODEL too
    assert back.meta["quantized"] and back.kind == "encoder"
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=ids).last_hidden_state, before)


def test_custom_module_needs_its_class(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 2))
    lowbit.quantize(model, "w4-g128")
    lowbit.save(model, tmp_path / "q")
    with pytest.raises(CheckpointError, match="module="):
        lowbit.load(tmp_path / "q")
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 2))
    back = lowbit.load(tmp_path / "q", module=fresh)
    x = torch.randn(4, 8)
    assert torch.equal(back.model(x), model(x))


def _saved(tmp_path):
    loaded = tiny_llama()
    lowbit.quantize(loaded, "w4-g128")
    return lowbit.save(loaded, tmp_path / "q")


def test_corrupt_checkpoints_are_refused(tmp_path):
    path = _saved(tmp_path)
    manifest = json.loads((path / "lowbit.json").read_text())

    (path / "lowbit.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        lowbit.load(path)

    bad = json.loads(json.dumps(manifest))
    name = next(iter(bad["layers"]))
    bad["layers"][name]["weight"]["format"]["bits"] = 3
    (path / "lowbit.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="packed codes"):
        lowbit.load(path)

    bad = json.loads(json.dumps(manifest))
    bad["layers"][name]["weight"]["shape"] = [8, 8]
    (path / "lowbit.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError):
        lowbit.load(path)

    bad = json.loads(json.dumps(manifest))
    bad["format_version"] = 99
    (path / "lowbit.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="newer"):
        lowbit.load(path)

    (path / "lowbit.json").write_text(json.dumps(manifest))
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        lowbit.load(path)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    before = sorted(p.name for p in path.iterdir())
    loaded = tiny_llama()
    lowbit.quantize(loaded, "w8-weight")

    import lowbit.export.checkpoint as ckpt

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(ckpt, "write_json", boom)
    with pytest.raises(RuntimeError):
        lowbit.save(loaded, path)
    # The old checkpoint is intact and no temporary directory is left behind.
    assert sorted(p.name for p in path.iterdir()) == before
    assert json.loads((path / "lowbit.json").read_text())["recipe"]["name"] == "w4-g128"
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
    shutil.rmtree(path)
    with pytest.raises(RuntimeError):
        lowbit.save(loaded, path)
    assert list(tmp_path.iterdir()) == []


def test_saving_an_unquantized_model_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="not quantized"):
        lowbit.save(nn.Linear(2, 2), tmp_path / "x")


def test_scales_that_left_fp16_range_round_trip_as_fp32(tmp_path):
    """Weights so small that their fp16 scales would underflow keep fp32 scales (exact codes);
    the checkpoint loads again and gives the same outputs."""

    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        with torch.no_grad():
            m[0].weight.mul_(1e-7)
        return m.eval()

    quantized = lowbit.quantize(model(), "w4-g128")
    assert quantized[0].qweight.scale.dtype == torch.float32  # the recipe asks for fp16
    lowbit.save(quantized, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q", module=model()).model
    assert loaded[0].qweight.scale.dtype == torch.float32
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded(x), quantized(x), rtol=0, atol=0)


def test_hf_directories_keep_the_class_config_json_names(tmp_path):
    """A ...ForSequenceClassification directory loads as that class (its classifier is not dropped
    for the bare encoder) and its checkpoint rebuilds the same class with the same outputs."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, num_labels=3
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path / "cls")
    loaded = lowbit.load_model(str(tmp_path / "cls"))
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    lowbit.quantize(loaded, "w8-weight")
    assert "classifier" in loaded.model.lowbit.schemes
    ids = torch.randint(0, 50, (2, 7))
    expected = loaded.model(input_ids=ids).logits
    back = lowbit.load(lowbit.save(loaded, tmp_path / "q"))
    assert type(back.model).__name__ == "BertForSequenceClassification"
    torch.testing.assert_close(back.model(input_ids=ids).logits, expected, rtol=0, atol=0)
    from lowbit.evaluation.embedding import encoder_hidden  # embeddings still come from the encoder

    with torch.no_grad():
        hidden = encoder_hidden(back.model, {"input_ids": ids})
        torch.testing.assert_close(hidden, back.model.bert(input_ids=ids).last_hidden_state)


def test_hf_image_classifier_directory_calibrates_and_keeps_its_preprocessing(tmp_path):
    """A ViT directory: images of any size are resized and normalised for it (config.json's image
    size), so the default calibration images feed a static recipe; the checkpoint keeps the
    preprocessing and classifies like the model it came from."""
    from transformers import ViTConfig, ViTForImageClassification

    from lowbit.data import photo_crops
    from lowbit.evaluation.classification import model_batches

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=48, num_labels=4,
    )  # fmt: skip
    ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    loaded = lowbit.load_model(str(tmp_path / "vit"))
    images = photo_crops(count=5).images  # different sizes, uint8
    batch = model_batches(images, loaded.preprocess)[0]
    assert batch.shape == (5, 3, 32, 32) and float(batch.min()) >= -1.0 and float(batch.max()) <= 1.0
    lowbit.quantize(loaded, "w8a8-static")  # default calibration: photo crops through the preprocessing
    back = lowbit.load(lowbit.save(loaded, tmp_path / "q"))
    torch.testing.assert_close(back.preprocess(images[0].unsqueeze(0)), loaded.preprocess(images[0].unsqueeze(0)))
    with torch.no_grad():
        torch.testing.assert_close(back.model(batch).logits, loaded.model(batch).logits)


@pytest.mark.parametrize("recipe", ["w4-g128", "int8-dynamic", "w4-g128-gptq"])
def test_gpt2_conv1d_layers_are_quantized_as_linears(recipe, tmp_path):
    """GPT-2 keeps its projections in transformers' Conv1D (weight stored [in, out]): they are
    quantized as the Linear layers they are, the model stays close to float, and the checkpoint
    rebuilds the same outputs from a fresh GPT-2 skeleton."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lowbit.nn import QLinear

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, n_inner=160)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    loaded = lowbit.load_model(str(tmp_path / "gpt2"))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = loaded.model(input_ids=ids).logits
    calib = [
        {"input_ids": torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(i))} for i in range(2)
    ]
    lowbit.quantize(loaded, recipe, calib=calib)
    names = [
        f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert all(isinstance(loaded.model.get_submodule(n), QLinear) for n in names)
    assert loaded.model.get_submodule("transformer.h.0.mlp.c_fc").qweight.shape == (160, 64)
    with torch.no_grad():
        quantized = loaded.model(input_ids=ids).logits
    assert float((quantized - reference).norm() / reference.norm()) < 0.2
    back = lowbit.load(lowbit.save(loaded, tmp_path / "q"))
    with torch.no_grad():
        torch.testing.assert_close(back.model(input_ids=ids).logits, quantized, rtol=0, atol=0)
    if recipe == "w4-g128":  # what cannot take these layers says so instead of writing wrong weights
        from lowbit.errors import UnsupportedError
        from lowbit.export.hf import export as export_hf
        from lowbit.streaming import quantize_streaming

        with pytest.raises(UnsupportedError, match="Conv1D"):
            export_hf(tmp_path / "q", tmp_path / "hf")
        with pytest.raises(UnsupportedError, match="Conv1D"):
            quantize_streaming(tmp_path / "gpt2", recipe, tmp_path / "streamed")
        assert not (tmp_path / "hf").exists() and not (tmp_path / "streamed").exists()
