"""A reward model trained on AI labels (canonical RLAIF), on a preference file (human labels: the RLHF baseline; or AI
labels written to a file), or on both mixed by `preferences.share`: a sequence-classification head (one logit) on a
Hugging Face model, trained by its own actor before RL, refreshed on fresh on-policy judge labels while the run goes
on, and read by RewardScorer. The trainer counts the pairs it saw from each source (the run's `reward_model_labels`).

Loss per judged pair (i, j) with soft label p = P(i ≻ j) and d = r(i) − r(j):
    margin_scale = 0:  −p log σ(d) − (1 − p) log σ(−d)                (cross-entropy on the soft label)
    margin_scale > 0:  −log σ(d_w − m),  m = margin_scale · |2p − 1|  (Bradley–Terry with the preference
                       strength as a margin; w is the judged winner; the self_reference margin)
Text is tokenized with the reward model's own tokenizer, so it need not share the policy's.
"""
from __future__ import annotations

import random
import time
from collections import deque

import numpy as np
import pyarrow as pa
import ray
import torch
import torch.nn.functional as F

from rlaif_ray.config import RunConfig
from rlaif_ray.console import stage_output_to_run_folder
from rlaif_ray.data.preferences import judged_pairs, preference_pairs
from rlaif_ray.data.transport import use_arrow_ipc


FILE_CHECK_PAIRS = 1024  # preference-file pairs the fit's agreement figure is measured on (at most)


def load_reward_model(path: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report calls the new score head "MISSING": it is, by design
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tok.pad_token_id  # the head reads the last non-pad token
    return model, tok


def score_texts(model, tok, prompts: list[str], responses: list[str], batch: int = 64) -> torch.Tensor:
    """One scalar per (prompt, response), right-padded batches."""
    out = []
    for k in range(0, len(prompts), batch):
        texts = [p + r for p, r in zip(prompts[k:k + batch], responses[k:k + batch])]
        enc = tok(texts, return_tensors="pt", padding=True)
        out.append(model(**enc).logits[:, 0])
    return torch.cat(out) if out else torch.zeros(0)


def pair_loss(d: torch.Tensor, p: torch.Tensor, margin_scale: float) -> torch.Tensor:
    if margin_scale <= 0:
        return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))
    sign = torch.where(p >= 0.5, 1.0, -1.0)
    return -F.logsigmoid(sign * d - margin_scale * (2 * p - 1).abs())


def labelled_pairs(table: pa.Table) -> list[tuple[str, str, str, float]]:
    """(prompt, response_i, response_j, P(i ≻ j)) for every judged pair in a labels table, each pair once."""
    prompts, responses = table.column("prompt").to_pylist(), table.column("response").to_pylist()
    return [(prompts[i], responses[i], responses[j], p) for i, j, p in judged_pairs(table)]


def pair_margins(model, tok, pairs: list) -> torch.Tensor:
    """r(first) − r(second) of each (prompt, first, second, ...) pair."""
    prompts = [x[0] for x in pairs]
    r = score_texts(model, tok, prompts + prompts, [x[1] for x in pairs] + [x[2] for x in pairs])
    return r[:len(pairs)] - r[len(pairs):]


def ranking_accuracy(model, tok, pairs: list) -> float:
    """Share of decided pairs (label ≠ 0.5) whose preferred response the reward model scores higher."""
    decided = [x for x in pairs if abs(x[3] - 0.5) > 1e-6]
    if not decided:
        return float("nan")
    with torch.no_grad():
        d = pair_margins(model, tok, decided).numpy()
    return float(np.mean([(di > 0) == (x[3] > 0.5) for di, x in zip(d, decided)]))


def minibatch(rng: random.Random, file_pairs: list, judge_pairs: list, size: int, share: float) -> tuple[list, list]:
    """`size` pairs as (from the preference file, from the judge's labels): a `share` of them from the file (all from
    whichever is there when one is empty)."""
    if not judge_pairs:
        return rng.sample(file_pairs, min(size, len(file_pairs))), []
    if not file_pairs:
        return [], rng.sample(judge_pairs, min(size, len(judge_pairs)))
    k = round(share * size)
    return rng.sample(file_pairs, min(k, len(file_pairs))), rng.sample(judge_pairs, min(size - k, len(judge_pairs)))


def fit_pairs(model, tok, opt, rng: random.Random, file_pairs: list, judge_pairs: list, steps: int, size: int,
              share: float, margin_scale: float) -> tuple[list[float], int, int]:
    """`steps` minibatch updates of the pairwise loss: (the losses, pairs trained from the file, from the judge).
    Runs without Ray (tests, offline training)."""
    model.train()
    losses, n_file, n_judge = [], 0, 0
    for _ in range(steps):
        from_file, from_judge = minibatch(rng, file_pairs, judge_pairs, size, share)
        mb = from_file + from_judge
        n_file, n_judge = n_file + len(from_file), n_judge + len(from_judge)
        loss = pair_loss(pair_margins(model, tok, mb), torch.tensor([x[3] for x in mb]), margin_scale).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses, n_file, n_judge


@ray.remote
class RewardModelTrainer:
    """Keeps the latest `reward.buffer_batches` labelled batches (and the preference file's pairs) and fits the
    reward model on them."""

    def __init__(self, model_path: str, cfg: dict, preferences: pa.Table | None = None, source: dict | None = None):
        use_arrow_ipc()  # tables in and out as one IPC buffer each (rlaif_ray.data.transport)
        self.cfg = RunConfig.model_validate(cfg)
        stage_output_to_run_folder(self.cfg, "reward-model-trainer")  # output.console=quiet: logs to run_dir/logs
        torch.manual_seed(self.cfg.loop.seed)
        self.rng = random.Random(self.cfg.loop.seed)
        self.model, self.tok = load_reward_model(model_path)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.reward.learning_rate)
        self.buffer: deque = deque(maxlen=self.cfg.reward.buffer_batches)
        self.fits = 0
        self.file_pairs = preference_pairs(preferences) if preferences is not None else []
        # the file's pairs each refit reports agreement on: a fixed sample, so a refit costs the same with a
        # 160k-pair human set as with a small one (the judge's pairs are bounded by the buffer already)
        self.file_check = random.Random(self.cfg.loop.seed).sample(self.file_pairs, min(FILE_CHECK_PAIRS,
                                                                                      len(self.file_pairs)))
        self.seen = {"judge_pairs": 0, "file_pairs": len(self.file_pairs), "file": source,
                     "file_share": self.cfg.preferences.share if self.file_pairs else 0.0,
                     "trained_on_judge": 0, "trained_on_file": 0}

    def labels_seen(self) -> dict:
        """Which labels the reward model saw: the judge's pairs buffered over the run, the file's pairs and where the
        file came from, and how many minibatch rows each source filled."""
        return dict(self.seen)

    def add(self, labels: pa.Table, save_path: str | None = None) -> int:
        """Buffer a labelled batch's pairs for the next refit; `save_path`: also keep the batch as Parquet (labels
        made beside the loop, `reward.label_share` < 1, reach the run's label dataset this way)."""
        if save_path:
            from rlaif_ray.data.transport import write_parquet
            write_parquet(labels, save_path)
        pairs = labelled_pairs(labels)
        self.buffer.append(pairs)
        self.seen["judge_pairs"] += len(pairs)
        return sum(len(b) for b in self.buffer)

    def fit(self, steps: int | None = None) -> dict:
        """`steps` minibatch updates on the buffered pairs and the file's; returns the loss, the agreement with the
        judge's buffered labels and with the file's (on at most FILE_CHECK_PAIRS of them) and the pairs of each
        source."""
        rcfg = self.cfg.reward
        judge_pairs = [p for batch in self.buffer for p in batch]
        if self.file_pairs and self.cfg.preferences.share >= 1:
            judge_pairs = []  # share 1: the file alone
        if not judge_pairs and not self.file_pairs:
            return {"rm_pairs": 0}
        t0 = time.perf_counter()
        steps = steps if steps is not None else rcfg.train_steps
        losses, from_file, from_judge = fit_pairs(self.model, self.tok, self.opt, self.rng, self.file_pairs,
                                                  judge_pairs, steps, rcfg.batch_pairs, self.cfg.preferences.share,
                                                  rcfg.margin_scale)
        self.seen["trained_on_file"] += from_file
        self.seen["trained_on_judge"] += from_judge
        self.fits += 1
        stats = {"rm_pairs": len(judge_pairs) + len(self.file_pairs), "rm_judge_pairs": len(judge_pairs),
                 "rm_file_pairs": len(self.file_pairs), "rm_loss": float(np.mean(losses)),
                 "rm_fits": self.fits}
        if judge_pairs:
            stats["rm_judge_agreement"] = ranking_accuracy(self.model, self.tok, judge_pairs)
        if self.file_pairs:
            stats["rm_file_agreement"] = ranking_accuracy(self.model, self.tok, self.file_check)
        stats["rm_fit_seconds"] = time.perf_counter() - t0
        return stats

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def save_state(self, path: str) -> str:
        """Everything a resumed run needs to continue the same fits: weights, optimizer, RNG, buffer."""
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "rng": self.rng.getstate(),
                    "buffer": list(self.buffer), "fits": self.fits, "seen": self.seen}, path)
        return path

    def load_state(self, path: str) -> int:
        state = torch.load(path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.rng.setstate(state["rng"])
        self.buffer.clear()
        self.buffer.extend(state["buffer"])
        self.fits = state["fits"]
        self.seen.update(state.get("seen", {}))
        return self.fits

    def save(self, path: str) -> str:
        self.model.save_pretrained(path, safe_serialization=True)
        self.tok.save_pretrained(path)
        return path
