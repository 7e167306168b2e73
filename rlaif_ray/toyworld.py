"""The toy world: a task with a ground-truth checker, a locally trained tokenizer, and two tiny
Llama-architecture models (a weak policy and a critic that judges better than chance), saved in
Hugging Face format. Everything is built here, on CPU, in well under a minute; nothing comes from a hub.

Task: single-digit addition. Prompt `"3+4="`, correct response `" 7"`. The policy is pre-trained on
answers that are right only `policy_correct_fraction` of the time, so RL has room to improve it; the
critic is trained on judge transcripts (pairwise and 1-10 scores) whose labels come from the checker.

Built once per config and cached under `toy.cache_dir/<hash>`; deterministic given `toy.seed`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlaif_ray.config import CriticConfig, ToyWorldConfig
from rlaif_ray.judge_prompts import JudgePrompts

BUILD_VERSION = "2"  # bump when the recipe changes, so old caches are not reused
SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}


@dataclass(frozen=True)
class ToyWorld:
    root: Path

    @property
    def policy(self) -> str:
        return str(self.root / "policy")

    @property
    def critic(self) -> str:
        return str(self.root / "critic")

    @property
    def prompts(self) -> str:
        return str(self.root / "prompts.jsonl")


# ---------------------------------------------------------------- the task and its checker
def make_prompts(max_operand: int) -> list[dict]:
    return [{"id": f"add-{a}-{b}", "prompt": f"{a}+{b}=", "reference": str(a + b)}
            for a in range(max_operand + 1) for b in range(max_operand + 1)]


def is_correct(response: str, reference: str | None) -> bool:
    """Ground truth: the response, stripped, is exactly the reference answer."""
    return reference is not None and response.strip() == reference.strip()


def _wrong_answer(rng: np.random.Generator, correct: int, max_answer: int) -> int:
    wrong = int(rng.integers(0, max_answer))
    return wrong if wrong < correct else wrong + 1


# ---------------------------------------------------------------- training corpora
def _policy_text(rng, rows, cfg: ToyWorldConfig) -> tuple[str, str]:
    row = rows[int(rng.integers(len(rows)))]
    correct = int(row["reference"])
    answer = correct if rng.random() < cfg.policy_correct_fraction else _wrong_answer(rng, correct, 2 * cfg.max_operand)
    return row["prompt"], f" {answer}"


# The critic learns in stages (fractions of `critic_train_steps`), each a mix (p_arithmetic, p_pairwise; the
# rest direct-score). A tiny model trained on the full mix from the start settles on "always prefer one slot";
# learning the sums first, then checking one answer, then comparing two, gets it to >95% pairwise accuracy.
CRITIC_STAGES = [(0.15, (1.0, 0.0)),   # plain arithmetic, so the judge knows the answers it judges
                 (0.40, (0.3, 0.0)),   # + direct scores: is this one answer right?
                 (0.45, (0.1, 0.6))]   # + pairwise: which of two answers is right?


def _critic_stage(step: int, steps: int) -> tuple[float, float]:
    start = 0.0
    for frac, mix in CRITIC_STAGES:
        start += frac
        if step < start * steps:
            return mix
    return CRITIC_STAGES[-1][1]


def _critic_text(rng, rows, cfg: ToyWorldConfig, critic: CriticConfig, mix=(0.2, 0.5)) -> tuple[str, str]:
    row = rows[int(rng.integers(len(rows)))]
    correct = int(row["reference"])
    wrong = _wrong_answer(rng, correct, 2 * cfg.max_operand)
    p_arith, p_pairwise = mix
    kind = rng.random()
    if kind < p_arith:
        return row["prompt"], f" {correct}"
    if kind < p_arith + p_pairwise:
        if rng.random() < 0.8:
            a, b, label = (correct, wrong, 0) if rng.random() < 0.5 else (wrong, correct, 1)
        else:  # two wrong answers: no preference to learn, the label is a coin flip
            a, b, label = wrong, _wrong_answer(rng, correct, 2 * cfg.max_operand), int(rng.integers(2))
        text = JudgePrompts(critic).pairwise(row["prompt"], f" {a}", f" {b}") + critic.pairwise_ending
        return text, critic.pairwise_labels[label]
    ok = rng.random() < 0.5
    score = int(rng.integers(8, 11)) if ok else int(rng.integers(1, 4))
    text = JudgePrompts(critic).direct(row["prompt"], f" {correct if ok else wrong}") + critic.direct_ending
    return text, critic.direct_labels[score - 1]


# ---------------------------------------------------------------- building
def _train_tokenizer(corpus: list[str], out_dirs: list[Path], critic: CriticConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(SPECIAL["bos"])
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL['bos']} $A", special_tokens=[(SPECIAL["bos"], bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                 pad_token=SPECIAL["pad"], model_max_length=256)
    for label in [*critic.pairwise_labels, *critic.direct_labels]:
        ids = hf.encode(label, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"toy tokenizer: judge label {label!r} is {len(ids)} tokens, expected 1")
    for d in out_dirs:
        hf.save_pretrained(d)
    return hf


def _encode_targets(tokenizer, pairs: list[tuple[str, str]], cache: dict):
    """(prefix, target) pairs -> padded batch whose labels cover only the target and the EOS after it."""
    import torch

    def encode(text: str, special: bool) -> list[int]:  # few distinct strings: tokenize each once
        if (text, special) not in cache:
            cache[text, special] = tokenizer.encode(text, add_special_tokens=special)
        return cache[text, special]

    seqs = [(encode(prefix, True), encode(target, False) + [tokenizer.eos_token_id]) for prefix, target in pairs]
    width = max(len(p) + len(t) for p, t in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, (p, t) in enumerate(seqs):
        ids[i, :len(p) + len(t)] = torch.tensor(p + t)
        attn[i, :len(p) + len(t)] = 1
        labels[i, len(p):len(p) + len(t)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": attn}, labels


def _train_model(tokenizer, texts_fn, steps: int, seed: int, out_dir: Path, log_prefix: str, *, hidden: int,
                 heads: int, lr: float, weight_decay: float = 0.0, batch: int = 64, warmup: int = 50) -> None:
    """Train a 2-layer Llama from scratch; `texts_fn(rng, step)` gives one (prefix, target) example.
    AdamW, linear warmup then cosine decay, gradients clipped at 1."""
    import math

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    rng = np.random.default_rng(seed)
    cache: dict = {}
    model.train()
    for step in range(steps):
        batch_ids, labels = _encode_targets(tokenizer, [texts_fn(rng, step) for _ in range(batch)], cache)
        loss = model(**batch_ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0 or step + 1 == steps:
            print(f"[toyworld] {log_prefix} step {step + 1}/{steps} target loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "generation_config.json").unlink(missing_ok=True)  # vLLM would read sampling defaults from it


def config_hash(cfg: ToyWorldConfig, critic: CriticConfig) -> str:
    keyed = {"v": BUILD_VERSION, **cfg.model_dump(exclude={"cache_dir"}),
             "templates": [critic.pairwise_template, list(critic.pairwise_labels), critic.direct_template,
                           critic.direct_labels]}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def build_toy_world(cfg: ToyWorldConfig, critic: CriticConfig | None = None, force: bool = False) -> ToyWorld:
    """Build (or reuse from cache) the toy tokenizer, policy, critic and prompts file."""
    from filelock import FileLock

    critic = critic or CriticConfig()
    cache = Path(os.path.expanduser(cfg.cache_dir))
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / config_hash(cfg, critic)
    with FileLock(str(root) + ".lock"):
        if root.is_dir() and not force:
            return ToyWorld(root)
        import torch
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=cache))
        try:
            rows = make_prompts(cfg.max_operand)
            with open(tmp / "prompts.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            corpus_rng = np.random.default_rng(cfg.seed)
            corpus = ["".join(_policy_text(corpus_rng, rows, cfg)) for _ in range(2000)]
            corpus += ["".join(_critic_text(corpus_rng, rows, cfg, critic)) for _ in range(2000)]
            (tmp / "policy").mkdir()
            (tmp / "critic").mkdir()
            tokenizer = _train_tokenizer(corpus, [tmp / "policy", tmp / "critic"], critic)
            _train_model(tokenizer, lambda r, step: _policy_text(r, rows, cfg), cfg.policy_train_steps, cfg.seed,
                         tmp / "policy", "policy", hidden=128, heads=2, lr=3e-3)
            # the critic is smaller (one 64-wide head) so it gets more steps in the same time
            n = cfg.critic_train_steps
            _train_model(tokenizer, lambda r, step: _critic_text(r, rows, cfg, critic, _critic_stage(step, n)), n,
                         cfg.seed + 1, tmp / "critic", "critic", hidden=64, heads=1, lr=5e-3, weight_decay=0.1)
            (tmp / "toyworld.json").write_text(json.dumps({"config": cfg.model_dump(), "hash": root.name}, indent=1))
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return ToyWorld(root)
