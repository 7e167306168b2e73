"""Run output: per-step metrics as JSONL and TensorBoard scalars (and the trackers), the per-sample ledger, each
step's examples, a progress bar."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: Path, tensorboard: bool = True, progress_total: int | None = None,
                 first_step: int = 0, trackers=None):
        """`first_step` > 0: a resumed run appends; TensorBoard events and examples from that step on are purged.
        `trackers`: `rlaif_ray.runtime.trackers.Trackers` that get every step's metrics and examples too."""
        self.run_dir, self.trackers = run_dir, trackers
        examples = run_dir / "examples.jsonl"
        if examples.exists():  # steps from first_step on run again
            kept = [row for row in read_jsonl(examples) if row["step"] < first_step]
            examples.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self.examples_file = open(examples, "a", buffering=1)
        self.metrics_lines = _count_lines(run_dir / "metrics.jsonl")  # checkpoints record how far each file got
        self.ledger_lines = _count_lines(run_dir / "samples.jsonl")
        self.metrics_file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.ledger_file = open(run_dir / "samples.jsonl", "a", buffering=1)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=first_step or None)
        self.bar = None
        if progress_total:
            from tqdm import tqdm
            self.bar = tqdm(total=progress_total, initial=first_step, desc="rlaif", unit="step", dynamic_ncols=True)

    def log_step(self, step: int, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        self.metrics_file.write(json.dumps({"step": step, **clean}) + "\n")
        self.metrics_lines += 1
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                    self.tb.add_scalar(key, value, step)
        if self.trackers is not None:
            self.trackers.log_step(step, clean)
        if self.bar is not None:
            self.bar.set_postfix(progress_figures(metrics), refresh=False)
            self.bar.update(1)

    def log_examples(self, step: int, rows: list[dict]) -> None:
        """A few samples of the step a person reads (rlaif_ray.data.examples)."""
        self.examples_file.write("".join(json.dumps({"step": step, **row}) + "\n" for row in rows))
        if self.trackers is not None:
            self.trackers.log_examples(step, rows)

    def log_outcomes(self, step: int, outcome: dict) -> None:
        rows = [{"sample_id": sid, "outcome": "trained", "step": step} for sid in outcome.get("trained", [])]
        rows += [{"sample_id": sid, "outcome": "dropped_stale", "step": step} for sid in outcome.get("stale", [])]
        rows += [{"sample_id": sid, "outcome": "skipped", "reason": reason, "step": step}
                 for sid, reason in outcome.get("skipped", [])]
        self.ledger_file.write("".join(json.dumps(row) + "\n" for row in rows))
        self.ledger_lines += len(rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.metrics_file.close()
        self.ledger_file.close()
        self.examples_file.close()


PROGRESS = (("true_accuracy", "accuracy"), ("judge_truth_agreement", "judge_ok"), ("reward_mean", "reward"),
            ("reward_std", "reward_sd"), ("kl", "kl"), ("samples_per_s", "samples/s"))


def progress_figures(metrics: dict) -> dict:
    """What the progress bar shows of a step: figures that move whatever the reward. True accuracy and the judge's
    agreement with the checker where a checker exists; the reward's mean unless it is zero by construction (pairwise
    win rates sum to zero within a prompt group), and its spread (zero: no prompt group gave a signal)."""
    shown = {}
    for key, name in PROGRESS:
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            continue
        if key == "reward_mean" and abs(value) < 1e-6:
            continue
        shown[name] = f"{value:.2f}" if key == "samples_per_s" else f"{value:.3f}"
    return shown


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
