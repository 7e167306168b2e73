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

BUILD_VERSION = "1"  # bump when the recipe changes, so old caches are not reused
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
def _policy_text(rng, rows, cfg: ToyWorldConfig) -> str:
    row = rows[int(rng.integers(len(rows)))]
    correct = int(row["reference"])
    answer = correct if rng.random() < cfg.policy_correct_fraction else _wrong_answer(rng, correct, 2 * cfg.max_operand)
    return row["prompt"], f" {answer}"


def _critic_text(rng, rows, cfg: ToyWorldConfig, critic: CriticConfig) -> str:
    row = rows[int(rng.integers(len(rows)))]
    correct = int(row["reference"])
    wrong = _wrong_answer(rng, correct, 2 * cfg.max_operand)
    kind = rng.random()
    if kind < 0.2:  # plain arithmetic, so the judge knows the answers it judges
        return row["prompt"], f" {correct}"
    if kind < 0.7:  # pairwise transcript
        if rng.random() < 0.8:
            a, b, label = (correct, wrong, 0) if rng.random() < 0.5 else (wrong, correct, 1)
        else:  # two wrong answers: no preference to learn, the label is a coin flip
            a, b, label = wrong, _wrong_answer(rng, correct, 2 * cfg.max_operand), int(rng.integers(2))
        text = critic.pairwise_template.format(prompt=row["prompt"], response_a=f" {a}", response_b=f" {b}")
        return text, critic.pairwise_labels[label]
    ok = rng.random() < 0.5
    score = int(rng.integers(8, 11)) if ok else int(rng.integers(1, 4))
    text = critic.direct_template.format(prompt=row["prompt"], response=f" {correct if ok else wrong}")
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


def _encode_targets(tokenizer, pairs: list[tuple[str, str]]):
    """(prefix, target) pairs -> padded batch whose labels cover only the target and the EOS after it."""
    import torch

    seqs, masks = [], []
    for prefix, target in pairs:
        p = tokenizer.encode(prefix)
        t = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(p + t)
        masks.append([0] * len(p) + [1] * len(t))
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, (seq, mask) in enumerate(zip(seqs, masks)):
        ids[i, :len(seq)] = torch.tensor(seq)
        attn[i, :len(seq)] = 1
        labels[i, :len(seq)] = torch.where(torch.tensor(mask) == 1, torch.tensor(seq), torch.tensor(-100))
    return {"input_ids": ids, "attention_mask": attn}, labels


def _train_model(tokenizer, texts_fn, steps: int, seed: int, out_dir: Path, log_prefix: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    model.train()
    for step in range(steps):
        pairs = [texts_fn(rng) for _ in range(64)]
        batch, labels = _encode_targets(tokenizer, pairs)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
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
            _train_model(tokenizer, lambda r: _policy_text(r, rows, cfg), cfg.policy_train_steps, cfg.seed,
                         tmp / "policy", "policy")
            _train_model(tokenizer, lambda r: _critic_text(r, rows, cfg, critic), cfg.critic_train_steps,
                         cfg.seed + 1, tmp / "critic", "critic")
            (tmp / "toyworld.json").write_text(json.dumps({"config": cfg.model_dump(), "hash": root.name}, indent=1))
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return ToyWorld(root)
