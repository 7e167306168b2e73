"""Experiment trackers beside metrics.jsonl and TensorBoard (`output.trackers`): MLflow and Weights & Biases, each
used only when installed (`pip install mlflow-skinny` / `pip install wandb`; neither is a dependency).

Each tracker gets the resolved config (MLflow: flattened params and config.yaml as an artifact; W&B: the run config),
every step's numeric metrics at its step, every step's examples (`output.examples_per_step`) as a table (MLflow:
`examples/step-NNNNNN.json` artifacts read by the UI's table view; W&B: an `examples` table), and at the end the
summary (MLflow: summary.json; W&B: the run summary) with the run's status. A resumed run (`--resume`) continues
the same tracker run: the ids are kept in run_dir/trackers.json.

MLflow's tracking URI is `output.mlflow_uri`, else `MLFLOW_TRACKING_URI`, else a local file store in run_dir/mlruns
(view it with `mlflow ui --backend-store-uri run_dir/mlruns`); MLflow 3 keeps its file store behind
MLFLOW_ALLOW_FILE_STORE=true, which is set for such a URI. W&B's mode is `output.wandb_mode`, else W&B's own
(WANDB_MODE): `offline` writes under run_dir/wandb and needs no network (`wandb sync` uploads it later).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

from rlaif_ray.config import ConfigError, RunConfig

PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}
INSTALL = {"mlflow": "pip install mlflow-skinny (or mlflow)", "wandb": "pip install wandb"}


def check_trackers(cfg: RunConfig) -> None:
    """Every tracker in `output.trackers` is installed (before any actor starts)."""
    for name in cfg.output.trackers:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"output.trackers: {name} is not installed in this environment ({INSTALL[name]}), "
                              f"or leave it out of output.trackers")


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))}


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class MlflowTracker:
    def __init__(self, cfg: RunConfig, run_dir: Path, run_id: str | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        uri = cfg.output.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri, self.client = uri, MlflowClient(tracking_uri=uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name(cfg.output.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.output.experiment)
            run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
            params = [Param(k, v[:6000]) for k, v in _flatten(cfg.model_dump(mode="json")).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=params[i:i + 100])
            self.client.log_dict(run_id, cfg.model_dump(mode="json"), "config.json")
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log_step(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        values = [Metric(k, v, now, step) for k, v in _numbers(metrics).items()]
        for i in range(0, len(values), 1000):
            self.client.log_batch(self.run_id, metrics=values[i:i + 1000])

    def log_examples(self, step: int, rows: list[dict]) -> None:
        columns = {key: [row.get(key) for row in rows] for key in rows[0]}
        self.client.log_table(self.run_id, columns, f"examples/step-{step:06d}.json")

    def close(self, summary: dict | None) -> None:
        if summary is not None:
            self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_terminated(self.run_id, "FINISHED" if summary and summary.get("status") == "finished"
                                   else "FAILED")


class WandbTracker:
    def __init__(self, cfg: RunConfig, run_dir: Path, run_id: str | None):
        import wandb
        self.wandb = wandb
        kwargs = {"mode": cfg.output.wandb_mode} if cfg.output.wandb_mode else {}
        self.run = wandb.init(project=cfg.output.experiment, name=run_dir.name, dir=str(run_dir), id=run_id,
                              resume="allow", config=cfg.model_dump(mode="json"), **kwargs)
        self.run_id = self.run.id

    def log_step(self, step: int, metrics: dict) -> None:
        self.run.log(_numbers(metrics), step=step)

    def log_examples(self, step: int, rows: list[dict]) -> None:
        columns = list(rows[0])
        table = self.wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.run.log({"examples": table}, step=step)

    def close(self, summary: dict | None) -> None:
        if summary is not None:
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish(exit_code=0 if summary and summary.get("status") == "finished" else 1)


TRACKERS = {"mlflow": MlflowTracker, "wandb": WandbTracker}


class Trackers:
    """The configured trackers as one: each call goes to every tracker."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False):
        ids_file = run_dir / "trackers.json"
        ids = json.loads(ids_file.read_text()) if resume and ids_file.exists() else {}
        self.trackers = {name: TRACKERS[name](cfg, run_dir, ids.get(name)) for name in cfg.output.trackers}
        if self.trackers:
            ids_file.write_text(json.dumps({name: t.run_id for name, t in self.trackers.items()}))

    def log_step(self, step: int, metrics: dict) -> None:
        for t in self.trackers.values():
            t.log_step(step, metrics)

    def log_examples(self, step: int, rows: list[dict]) -> None:
        if rows:
            for t in self.trackers.values():
                t.log_examples(step, rows)

    def close(self, summary: dict | None = None) -> None:
        for t in self.trackers.values():
            t.close(summary)
