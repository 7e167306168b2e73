"""The toy world: a task with a ground-truth checker, a locally trained tokenizer, and two tiny
Llama-architecture models (a weak policy and a critic that judges well), saved in Hugging Face format.
Everything is built here, on CPU, in 70-90 s; nothing comes from a hub.

Task: single-digit addition. Prompt `"3+4="`, correct response `" 7"`.

Policy: pre-trained on answers that are right `policy_correct_fraction` of the time. With
`policy_wrong_mode="off_by_one"` most wrong answers are the sum plus one, so greedy decoding is mostly wrong
while sampling at temperature 1 is right about `policy_correct_fraction` of the time: weak, but RL with a
ground-truth or a good AI reward lifts it quickly. (`"random"`: wrong answers are uniform.)

Critic: trained on exactly the judge strings `rlaif_ray.judge.templates` builds from `CriticConfig`, with labels
from the checker, for every labeling method:
- arithmetic: `self_answer_template` -> the sum (self_reference's first step);
- direct: `direct_template + direct_ending` -> a score label (8-10 if right, 1-3 if wrong);
- pairwise: `pairwise_template + pairwise_ending` -> the label of the right answer's slot;
- cot: `pairwise_template + cot_prompt` -> the sum as rationale, then `... + rationale + pairwise_ending` -> label;
- self_reference: `self_reference_template + critique_prompt` -> " yes"/" no" for each answer (does it match
  the judge's own answer?), then `... + critique + pairwise_ending` -> label.
When both answers are wrong the label is a coin flip. Some cot/self_reference examples carry a wrong rationale or
own answer (`WRONG_OWN`) while the label stays the true one, so the verdict does not blindly follow them.
Wherever a judge prompt shows the correct answer, the critic is also trained to write it there (auxiliary
targets), which gives it the sum right where it has to compare. A curriculum (`CRITIC_STAGES`) and the model
shape (`CRITIC_MODEL`) keep it from settling on "always prefer one slot".

Built once per config and cached under `toy.cache_dir/<hash>` (the hash covers the toy config, the recipe
version and every judge string the critic is trained on); deterministic given `toy.seed`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlaif_ray.config import CriticConfig, ToyWorldConfig
from rlaif_ray.judge.reply import concrete_labels
from rlaif_ray.judge.templates import JudgePrompts

BUILD_VERSION = "3"  # bump when the recipe changes, so old caches are not reused
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


# ---------------------------------------------------------------- the task (its checker: rlaif_ray.data.checkers)
def make_prompts(max_operand: int) -> list[dict]:
    return [{"id": f"add-{a}-{b}", "prompt": f"{a}+{b}=", "reference": str(a + b)}
            for a in range(max_operand + 1) for b in range(max_operand + 1)]


def _wrong_answer(rng: np.random.Generator, correct: int, max_answer: int) -> int:
    wrong = int(rng.integers(0, max_answer))
    return wrong if wrong < correct else wrong + 1


# ---------------------------------------------------------------- training corpora
# A training example is a list of (text, trained) segments: their concatenation is the text the model reads, and
# the last segment is the target (followed by EOS) that the model learns to write. Earlier segments may be
# trained too (auxiliary targets): in the critic's judge prompts, every answer slot that holds the correct answer.
Example = list[tuple[str, bool]]
OFF_BY_ONE_SHARE = 0.7  # policy_wrong_mode="off_by_one": share of the wrong answers that are correct+1


def _policy_example(rng, rows, cfg: ToyWorldConfig) -> Example:
    row = rows[int(rng.integers(len(rows)))]
    correct = int(row["reference"])
    if rng.random() < cfg.policy_correct_fraction:
        answer = correct
    elif cfg.policy_wrong_mode == "off_by_one" and rng.random() < OFF_BY_ONE_SHARE:
        answer = correct + 1
    else:
        answer = _wrong_answer(rng, correct, 2 * cfg.max_operand)
    return [(row["prompt"], False), (f" {answer}", True)]


def _critic_wrong(rng, correct: int, max_operand: int) -> int:
    """A wrong answer for the critic to judge: often a near miss (what a weak policy gets wrong), else any."""
    if rng.random() < NEAR_MISS:
        wrong = correct + (-2, -1, 1, 1, 2)[int(rng.integers(0, 5))]  # = rng.choice([...]), faster
        if wrong >= 0:
            return wrong
    return _wrong_answer(rng, correct, 2 * max_operand + 1)


# The critic learns in stages (fractions of `critic_train_steps`), each a mix of example kinds (weights).
# Trained on everything at once, it often stays at chance on every comparison for a long time; checking a
# single answer (direct scores) first gives it the comparison that the two-answer prompts then build on.
CRITIC_STAGES = [
    (0.07, {"arith": 1.0}),                                   # plain arithmetic: the judge knows the answers
    (0.25, {"arith": 0.1, "direct": 0.9}),                    # is this one answer right?
    (0.68, {"arith": 0.05, "direct": 0.15, "pairwise": 0.2, "cot_think": 0.1, "cot_label": 0.15,
            "self_critique": 0.2, "self_label": 0.15}),       # every judge prompt
]
NEAR_MISS = 0.4       # share of the critic's wrong answers that are within 2 of the sum
TWO_WRONG = 0.2       # share of comparisons where both answers are wrong (coin-flip label)
WRONG_OWN = 0.2       # share of cot/self_reference examples whose rationale/own answer is wrong
AUX_TARGETS = True    # train the correct answer wherever a judge prompt shows it
_KINDS = ("arith", "direct", "pairwise", "cot_think", "cot_label", "self_critique", "self_label")
_ANSWER_FIELDS = {"response", "response_a", "response_b", "own_answer"}


@functools.lru_cache(maxsize=None)
def _mix_cdf(mix: tuple) -> tuple[list[str], np.ndarray]:
    weights = np.array([w for _, w in mix], dtype=float)
    cdf = (weights / weights.sum()).cumsum()
    cdf /= cdf[-1]
    return [k for k, _ in mix], cdf


@functools.lru_cache(maxsize=None)
def _parse(template: str) -> list[tuple[str, str | None]]:
    import string
    return [(literal, field) for literal, field, _, _ in string.Formatter().parse(template)]


def _critic_stage(step: int, steps: int) -> dict:
    start = 0.0
    for frac, mix in CRITIC_STAGES:
        start += frac
        if step < start * steps:
            return mix
    return CRITIC_STAGES[-1][1]


def _fill(judge: JudgePrompts, method: str, correct: str, **values) -> Example:
    """The judge prompt body of `method` as segments, the answer fields holding `correct` marked trained.
    Must equal `JudgePrompts.<method>(**values)` character for character (checked)."""
    template = {"pairwise": judge.cfg.pairwise_template, "direct": judge.cfg.direct_template,
                "self_reference": judge.cfg.self_reference_template}[method]
    segs: Example = [(judge._head(""), False)]
    for literal, field in _parse(template):
        segs.append((literal, False))
        if field is not None:
            value = "" if field == "principle" else values[field]
            segs.append((value, AUX_TARGETS and field in _ANSWER_FIELDS and value == correct))
    if "".join(t for t, _ in segs) != getattr(judge, method)(**values):  # a template with format specs
        return [(getattr(judge, method)(**values), False)]
    return [seg for seg in segs if seg[0]]


def _critic_example(rng, rows, cfg: ToyWorldConfig, critic: CriticConfig, mix: dict | None = None) -> Example:
    """One judge-prompt example of a kind drawn from `mix`; labels come from the checker."""
    kinds, cdf = _mix_cdf(tuple((mix or {k: 1.0 for k in _KINDS}).items()))
    kind = kinds[int(cdf.searchsorted(rng.random(), side="right"))]  # = rng.choice(len(kinds), p=...), faster
    row = rows[int(rng.integers(len(rows)))]
    prompt, correct = row["prompt"], int(row["reference"])
    judge, right = JudgePrompts(critic), f" {correct}"
    if kind == "arith":
        return [(judge.self_answer(prompt), False), (right, True)]
    wrong = _critic_wrong(rng, correct, cfg.max_operand)
    if kind == "direct":
        ok = rng.random() < 0.5
        score = int(rng.integers(8, 11)) if ok else int(rng.integers(1, 4))
        body = _fill(judge, "direct", right, prompt=prompt, response=f" {correct if ok else wrong}")
        return body + [(critic.direct_ending, False), (critic.direct_labels[score - 1], True)]
    # a comparison of two answers: one right (label = its slot) or, sometimes, both wrong (label a coin flip)
    if rng.random() < TWO_WRONG:
        other = _critic_wrong(rng, correct, cfg.max_operand)
        while other == wrong:
            other = _critic_wrong(rng, correct, cfg.max_operand)
        a, b, label = wrong, other, int(rng.integers(2))
    else:
        a, b, label = (correct, wrong, 0) if rng.random() < 0.5 else (wrong, correct, 1)
    a, b = f" {a}", f" {b}"
    own = right if rng.random() >= WRONG_OWN else f" {_critic_wrong(rng, correct, cfg.max_operand)}"
    verdict = [(critic.pairwise_ending, False), (critic.pairwise_labels[label], True)]
    if kind in ("pairwise", "cot_think", "cot_label"):
        body = _fill(judge, "pairwise", right, prompt=prompt, response_a=a, response_b=b)
        if kind == "pairwise":
            return body + verdict
        if kind == "cot_think":  # the rationale is the judge's own computation of the answer
            return body + [(critic.cot_prompt, False), (right, True)]
        return body + [(critic.cot_prompt, False), (own, AUX_TARGETS and own == right)] + verdict
    body = _fill(judge, "self_reference", right, prompt=prompt, own_answer=own, response_a=a, response_b=b)
    critique = " " + " ".join("yes" if x == own else "no" for x in (a, b))  # does each answer match mine?
    if kind == "self_critique":
        return body + [(critic.critique_prompt, False), (critique, True)]
    return body + [(critic.critique_prompt, False), (critique, True)] + verdict


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


def _encode_targets(tokenizer, examples: list[Example], cache: dict):
    """Examples -> padded batch (right padding) and labels covering only the trained segments and the EOS.
    Everything before the final target is tokenized as one text, as the judge prompt is at inference (trained
    spans found by character offsets); the final target is tokenized on its own, as the model writes it."""
    import torch

    misses = {}
    for example in examples:
        key = tuple(example)
        if key not in cache and key not in misses:
            misses[key] = example
    if misses:  # one batched call for everything not seen before
        heads = ["".join(seg for seg, _ in example[:-1]) for example in misses.values()]
        encs = tokenizer(heads, return_offsets_mapping=True)
        for i, (key, example) in enumerate(misses.items()):
            spans, pos = [], 0
            for seg, trained in example[:-1]:
                if trained:
                    spans.append((pos, pos + len(seg)))
                pos += len(seg)
            ids = encs["input_ids"][i]
            labels = [t if e > s and any(a <= s < b for a, b in spans) else -100
                      for t, (s, e) in zip(ids, encs["offset_mapping"][i])]
            target = example[-1][0]
            if ("tail", target) not in cache:
                cache["tail", target] = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
            tail = cache["tail", target]
            cache[key] = (ids + tail, labels + tail)
    seqs = [cache[tuple(example)] for example in examples]
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.tensor([seq + [tokenizer.pad_token_id] * (width - len(seq)) for seq, _ in seqs])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in seqs])
    return ids, labels


# Both are initialised with std 0.1 instead of the default 0.02: from the small default they sit on a long
# plateau before attention learns to look anywhere in particular (the policy then never learns the sums well
# enough for RL to move it, the critic stays at chance on every comparison).
POLICY_MODEL = dict(hidden=128, heads=2, layers=2, lr=3e-3, init=0.1)
# The critic is narrow but deep: comparing an answer with the sum and reading the verdict from the right slot
# takes several attention steps, and with two or three layers it often never learns to ("always prefer one
# slot"). Embeddings are tied, so an answer token it reads is the one it would write.
CRITIC_MODEL = dict(hidden=64, heads=2, layers=4, lr=2e-3, weight_decay=0.1, tie=True, init=0.1)


def _train_model(tokenizer, examples_fn, steps: int, seed: int, out_dir: Path, log_prefix: str, *, hidden: int,
                 heads: int, layers: int, lr: float, weight_decay: float = 0.0, tie: bool = False,
                 init: float = 0.02, batch: int = 64, warmup: int = 50) -> None:
    """Train a small Llama from scratch; `examples_fn(rng, step)` gives one example (segments).
    AdamW, linear warmup then cosine decay, gradients clipped at 1; the loss covers only the targets."""
    import math

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=tie, initializer_range=init, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    rng = np.random.default_rng(seed)
    cache: dict = {}
    model.train()
    for step in range(steps):
        ids, labels = _encode_targets(tokenizer, [examples_fn(rng, step) for _ in range(batch)], cache)
        # right padding: no real token attends to a pad under the causal mask, so no attention mask is needed;
        # the vocabulary projection is applied only where there is a target
        hidden_states = model.model(input_ids=ids).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != -100
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden_states[keep]), targets[keep])
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
    """Cache key: the recipe version, the toy config and every judge string the critic is trained on."""
    judge = critic.model_dump(include={"preamble", "few_shot", "pairwise_template", "pairwise_ending",
                                       "pairwise_labels", "cot_prompt", "self_answer_template",
                                       "self_reference_template", "critique_prompt", "direct_template",
                                       "direct_ending", "direct_labels"})
    judge["pairwise_labels"] = list(judge["pairwise_labels"])
    # the default critic width is left out of the key, so the worlds built before the knob existed stay cached
    exclude = {"cache_dir"} | ({"critic_width"} if cfg.critic_width == 64 else set())
    keyed = {"v": BUILD_VERSION, **cfg.model_dump(exclude=exclude), "judge": judge}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def build_toy_world(cfg: ToyWorldConfig, critic: CriticConfig | None = None, force: bool = False) -> ToyWorld:
    """Build (or reuse from cache) the toy tokenizer, policy, critic and prompts file."""
    from filelock import FileLock

    critic = concrete_labels(critic or CriticConfig(), choice_without_tokenizer=0)  # " 1": what the toy critic learns
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
            corpus = ["".join(t for t, _ in _policy_example(corpus_rng, rows, cfg)) for _ in range(2000)]
            corpus += ["".join(t for t, _ in _critic_example(corpus_rng, rows, cfg, critic)) for _ in range(2000)]
            (tmp / "policy").mkdir()
            (tmp / "critic").mkdir()
            tokenizer = _train_tokenizer(corpus, [tmp / "policy", tmp / "critic"], critic)
            _train_model(tokenizer, lambda r, step: _policy_example(r, rows, cfg), cfg.policy_train_steps, cfg.seed,
                         tmp / "policy", "policy", **POLICY_MODEL)
            n = cfg.critic_train_steps
            _train_model(tokenizer, lambda r, step: _critic_example(r, rows, cfg, critic, _critic_stage(step, n)), n,
                         cfg.seed + 1, tmp / "critic", "critic",
                         **{**CRITIC_MODEL, "hidden": cfg.critic_width, "heads": cfg.critic_width // 32})
            (tmp / "toyworld.json").write_text(json.dumps({"config": cfg.model_dump(), "hash": root.name}, indent=1))
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return ToyWorld(root)
