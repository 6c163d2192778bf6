"""Streaming quantization at scale: synthetic Llama checkpoints of N GB, quantized with
``lowbit quantize --stream`` in a child process each; wall time and the child's peak RSS, as JSON.

The source is random bf16 weights of a Llama architecture (hidden 2048, 5632 MLP, 32000 vocab,
as many layers as the size asks), written shard by shard so generating it needs little memory.
Sizes without room on the disk (source + output + 1 GB) are refused.

    nice .venv/bin/python bench/scale.py --gb 1 2 4 > bench/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, MLP, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 16, 4
LAYER_SHAPES = {
    "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.k_proj.weight": (HIDDEN // HEADS * KV_HEADS, HIDDEN),
    "self_attn.v_proj.weight": (HIDDEN // HEADS * KV_HEADS, HIDDEN),
    "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "mlp.gate_proj.weight": (MLP, HIDDEN),
    "mlp.up_proj.weight": (MLP, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, MLP),
    "input_layernorm.weight": (HIDDEN,),
    "post_attention_layernorm.weight": (HIDDEN,),
}


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out


def layers_for(gb: float) -> int:
    """Decoder layers giving about ``gb`` GB of bf16 weights (embeddings and head included)."""
    per_layer = 2 * sum(_numel(s) for s in LAYER_SHAPES.values())
    fixed = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    return max(1, round((gb * 1e9 - fixed) / per_layer))


def tensor_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        shapes += [(f"model.layers.{i}.{key}", shape) for key, shape in LAYER_SHAPES.items()]
    return [*shapes, ("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def write_synthetic(path: Path, gb: float, shard_gb: float = 1.0) -> int:
    """A HF Llama directory of random bf16 weights, one shard in memory at a time; its bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    layers = layers_for(gb)
    path.mkdir(parents=True)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    config.dtype = torch.bfloat16
    config.save_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, total, count = {}, {}, 0, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, count
        if shard:
            count += 1
            name = f"model-{count:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_bytes = {}, 0

    for name, shape in tensor_shapes(layers):
        if len(shape) == 1:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        size = tensor.numel() * 2
        if shard and shard_bytes + size > shard_gb * 1e9:
            flush()
        shard[name] = tensor
        shard_bytes += size
        total += size
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def run_stream(source: Path, out: Path, recipe: str) -> dict:
    """`lowbit quantize --stream` in a child process: wall seconds and its peak RSS (wait4)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "lowbit", "quantize", str(source), "--recipe", recipe]
    cmd += ["--out", str(out), "--stream", "--json", "--quiet"]
    with tempfile.TemporaryFile() as out_fh, tempfile.TemporaryFile() as err_fh:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out_fh, stderr=err_fh, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (ru_maxrss in KiB)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out_fh.seek(0)
        err_fh.seek(0)
        stdout, stderr = out_fh.read(), err_fh.read()
    peak_kb = usage.ru_maxrss
    if child.returncode != 0:
        raise SystemExit(f"quantize --stream failed ({child.returncode}):\n{stderr.decode()[-2000:]}")
    result = json.loads(stdout)
    return {"wall_s": wall, "peak_rss_mb": peak_kb / 1024, "cli": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, nargs="+", default=[1, 2, 4], help="Source sizes in GB (bf16).")
    parser.add_argument("--recipe", default="w4-g128")
    parser.add_argument("--dir", type=Path, default=None, help="Where to write the checkpoints (default: a temp dir).")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lowbit-scale-", dir=args.dir))
    rows = []
    try:
        for gb in sorted(args.gb):
            free = shutil.disk_usage(root).free
            need = gb * 1e9 * 1.6 + 1e9  # source, output (float32 embeddings + int4 codes), margin
            if free < need:
                print(f"skip {gb} GB: needs {need / 1e9:.1f} GB free, {free / 1e9:.1f} GB available", file=sys.stderr)
                rows.append({"gb": gb, "skipped": f"not enough disk ({free / 1e9:.1f} GB free)"})
                continue
            source, out = root / f"src-{gb:g}", root / f"out-{gb:g}"
            start = time.perf_counter()
            source_bytes = write_synthetic(source, gb)
            made = time.perf_counter() - start
            run = run_stream(source, out, args.recipe)
            out_bytes = sum(f.stat().st_size for f in out.iterdir())
            row = {
                "gb": gb,
                "source_bytes": source_bytes,
                "layers": layers_for(gb),
                "output_bytes": out_bytes,
                "output_files": len(list(out.glob("*.safetensors"))),
                "generate_s": round(made, 1),
                "wall_s": round(run["wall_s"], 1),
                "s_per_gb": round(run["wall_s"] / (source_bytes / 1e9), 1),
                "peak_rss_mb": round(run["peak_rss_mb"]),
            }
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
            shutil.rmtree(source)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    info = {
        "recipe": args.recipe,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
