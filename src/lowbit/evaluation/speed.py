"""Latency and throughput of a loaded model per input shape (what `lowbit bench` prints).

Inputs are synthetic but shaped as the model's users feed it: token ids drawn from the
tokenizer's vocabulary (full attention mask) for language models and encoders, images of the
size the preprocess produces for image classifiers. Medians over timed runs after warm-up."""

from __future__ import annotations

import time

import torch

from ..errors import DataError, ModelError
from ..models import Loaded
from .latency import latency


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'1x32,16x128' -> [(1, 32), (16, 128)] (batch x sequence length, or batch x image side)."""
    shapes = []
    for part in text.split(","):
        try:
            batch, length = (int(v) for v in part.lower().strip().split("x"))
        except ValueError:
            raise DataError(f"shape {part!r} is not BATCHxLENGTH; write e.g. 1x32,16x128") from None
        if batch < 1 or length < 1:
            raise DataError(f"shape {part!r}: batch and length must be >= 1")
        shapes.append((batch, length))
    if not shapes:
        raise DataError("no shapes given; write e.g. 1x32,16x128")
    return shapes


def _token_inputs(loaded: Loaded, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    vocab = getattr(loaded.tokenizer, "vocab_size", None) or getattr(loaded.model.config, "vocab_size", None)
    if not vocab:
        raise ModelError(f"{loaded.source}: no tokenizer vocabulary to draw inputs from")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(vocab), (batch, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _TokenClock:
    """A ``generate`` streamer that stamps the time each new token arrives (the first call is the prompt)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.stamps.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def decode_speed(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Greedy decode tokens/s at batch 1 with the KV cache: the time from the first new token to the
    last over the tokens in between (the first token is prefill). A warm-up generate of the same
    length runs first, so a compiled decode step (``lowbit.runtime.compile``) is traced untimed."""
    if new_tokens < 2:
        raise DataError(f"decode speed needs at least 2 new tokens, got {new_tokens}")
    gen = {"do_sample": False, "use_cache": True, "pad_token_id": 0}
    gen |= {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    with torch.inference_mode():
        model.generate(prompt, **gen)  # warm-up: kernel layouts, allocator, compiled decode step
        clock = _TokenClock()
        model.generate(prompt, streamer=clock, **gen)
    per_token = max(clock.stamps[-1] - clock.stamps[0], 1e-9) / (len(clock.stamps) - 1)
    return {"decode_tokens_per_s": 1.0 / per_token, "decode_ms_per_token": per_token * 1e3, "new_tokens": new_tokens}


def model_speed(
    loaded: Loaded, shapes: list[tuple[int, int]], seconds: float = 1.0, decode_tokens: int = 32, seed: int = 0
) -> dict:
    """Per shape: median latency (ms) and items/s; for causal LMs also decode tokens/s."""
    model = loaded.model.eval()
    rows = []
    for batch, length in shapes:
        if loaded.kind == "image-classifier":
            channels = next((m.in_channels for m in model.modules() if hasattr(m, "in_channels")), 3)
            x = torch.rand(batch, channels, length, length, generator=torch.Generator().manual_seed(seed))
            timing = latency(lambda x=x: model(x), warmup=2, repeat=5, min_seconds=seconds)
            unit, items = "images/s", batch
        else:
            inputs = _token_inputs(loaded, batch, length, seed)
            extra = {"use_cache": False} if loaded.kind == "causal-lm" else {}
            timing = latency(
                lambda inputs={**inputs, **extra}: model(**inputs), warmup=2, repeat=5, min_seconds=seconds
            )
            unit, items = "tokens/s", batch * length
        rows.append(
            {
                "batch": batch,
                "length": length,
                "median_ms": timing["median_ms"],
                "p10_ms": timing["p10_ms"],
                "p90_ms": timing["p90_ms"],
                "runs": timing["runs"],
                "throughput": items / timing["median_ms"] * 1e3,
                "unit": unit,
            }
        )
    out: dict = {"model": loaded.source, "kind": loaded.kind, "threads": torch.get_num_threads(), "rows": rows}
    if loaded.kind == "causal-lm" and decode_tokens >= 2 and hasattr(model, "generate"):
        prompt = _token_inputs(loaded, 1, 32, seed)["input_ids"]
        out["decode"] = decode_speed(model, prompt, decode_tokens)
    return out
