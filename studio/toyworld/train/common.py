"""What every toy-model training stage shares: data, tokenizer, EMA and resumable checkpoints.

Checkpoints are safetensors only (weights, EMA weights and the optimizer's tensors) with
the step and the optimizer's scalars in the file's metadata, written atomically; a stage
killed at any moment resumes from its last checkpoint. Batches are drawn from a
`random.Random` seeded by (stage seed, step), so a resumed run sees the same data.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..captions import sample_pair
from ..render import render
from ..world import ALL_SHAPES, BACKGROUNDS, COLORS, POSITIONS

MAX_TOKENS = 32
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batch_rng(seed: int, step: int) -> random.Random:
    return random.Random(seed * 1_000_003 + step)


def images_to_tensor(images) -> torch.Tensor:
    """PIL images to a (B, 3, H, W) tensor in [-1, 1], as diffusers' image processors do."""
    arr = np.stack([np.asarray(img, dtype=np.float32) for img in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def sample_batch(rng: random.Random, size: int, **caption_kwargs) -> tuple[list[str], torch.Tensor]:
    pairs = [sample_pair(rng, **caption_kwargs) for _ in range(size)]
    return [c for c, _ in pairs], images_to_tensor([render(s) for _, s in pairs])


# --------------------------------------------------------------------------- tokenizer


def vocabulary_words() -> list[str]:
    words = {"a", "two", "three", "on", "background", "to", "the", "left", "of", "above", "and"}
    words |= {"small", "large", "shape", "shapes", "sks"}
    words |= set(COLORS) | set(BACKGROUNDS) | set(ALL_SHAPES) | {s + "s" for s in ALL_SHAPES}
    for phrase in POSITIONS:
        words |= set(phrase.split())
    for instruction in ("make the", "turn the into a", "make the background"):
        words |= set(instruction.split())
    return sorted(words)


def build_tokenizer():
    """A CLIP BPE tokenizer (vocab + merges) in which every toy-world word is one token.

    Any other text still tokenizes, character by character, so prompts outside the
    grammar (and the personalization word `sks`) work as in real CLIP.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = [chr(c) for c in range(33, 127)]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        min_frequency=1,
        special_tokens=list(SPECIAL),
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(vocabulary_words())] * 4, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = dict(state["vocab"])
    for ch in alphabet:  # lone characters at a word's end
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Save the tokenizer as CLIP ships it: vocab.json and merges.txt beside tokenizer.json."""
    tokenizer.save_pretrained(folder)
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(state["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


# --------------------------------------------------------------------------- EMA and checkpoints


class EMA:
    """Exponential moving average of weights, with warm-up: decay = min(decay, (1+n)/(10+n))."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})


def save_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer, step: int, ema=None) -> None:
    tensors, scalars = {}, {"step": step, "saved": time.time()}
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"model.{name}.{k}"] = v.detach().cpu().contiguous()
    for k, v in ema.shadow.items() if ema else ():
        tensors[f"ema.{k}"] = v.cpu().contiguous()
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault("opt_scalars", {})[f"{pid}.{k}"] = v
    scalars["param_groups"] = opt["param_groups"]
    scalars["ema_updates"] = ema.updates if ema else 0
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(scalars)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer, ema=None) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        scalars = json.loads(f.metadata()["state"])
    tensors = load_file(str(path))
    for name, module in modules.items():
        prefix = f"model.{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    if ema is not None:
        ema.shadow = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        ema.updates = scalars["ema_updates"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            if name == "step":
                v = v.reshape(())
            elif v.shape != params[int(pid)].shape and v.numel() == params[int(pid)].numel():
                v = v.reshape(params[int(pid)].shape)  # checkpoints that stored 0-dim state as (1,)
            state.setdefault(int(pid), {})[name] = v
    for k, v in scalars.get("opt_scalars", {}).items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})
    return int(scalars["step"])


class StepPlan:
    """How many steps a stage's loop runs: `steps`, or, given a wall-clock `budget` in
    seconds, at most as many as fit in it — fitted once, from the pace of this run's first
    PROBE steps (the first WARM of them not counted: CUDA and the allocator warm up there).
    The learning-rate schedule reads `total`, so it follows the fitted count."""

    WARM, PROBE = 10, 60

    def __init__(self, steps: int, budget: float | None = None):
        self.total, self.budget = steps, budget

    def run(self, start: int):
        step, began = start, time.time()
        while step < self.total:
            yield step
            step += 1
            if self.budget and step - start == self.WARM:
                warm = time.time()
            elif self.budget and step - start == self.PROBE:
                pace = (time.time() - warm) / (self.PROBE - self.WARM)
                left = self.budget - (time.time() - began)
                self.total = min(self.total, step + max(0, int(left / pace)))


def warmup_lr(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup)


def cosine_decay(step: int, steps: int, floor: float = 0.1) -> float:
    """Learning-rate multiplier: cosine from 1 at step 0 down to `floor` at the last step."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(step / steps * math.pi))


def log(stage: str, step: int, total: int, **values) -> None:
    parts = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"[{stage}] step {step}/{total} {parts}", flush=True)
