"""Run checkpoints on disk: one folder per checkpoint, written atomically, and the resume point they hold.

    run_dir/checkpoints/
        step-000004/          policy/ (Hugging Face), deepspeed/ (every rank's model + optimizer state),
                              reward_model.pt (trainer state, if any), state.json (the loop's state)
        latest                "step-000004"

A checkpoint is assembled in `.tmp-step-NNNNNN` and renamed into place only when complete (a rename within
one folder is atomic), then `latest` is replaced (write + rename). A crash mid-write leaves a `.tmp-*` folder,
which is ignored and removed later, and `latest` still names the previous, complete checkpoint.

`state.json` holds what the driver needs to continue exactly: the next step, the policy version, the prompt
sampler (cursor, order, RNG state), the batches in flight (their steps and prompt indices, re-issued on resume
under the same sample ids), the counters, and how many lines of metrics.jsonl / samples.jsonl belong to the
steps before it (later lines are cut on resume, so the ledger holds every sample id once).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from rlaif_ray.config import ConfigError, RunConfig

STATE_FILE = "state.json"
# keys that may change between a run and its resume: how long it runs, where it writes, what it survives
RESUMABLE_CHANGES = ("loop.num_steps", "loop.eval_samples", "output", "ray", "fault", "checkpoint", "serve", "sync")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def config_digest(cfg: RunConfig) -> str:
    """A hash of everything that decides what the run computes (not RESUMABLE_CHANGES)."""
    tree = cfg.model_dump(mode="json")
    for key in RESUMABLE_CHANGES:
        node, *rest = key.split(".")
        if rest:
            tree[node].pop(rest[0], None)
        else:
            tree.pop(node, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def prompts_digest(prompts) -> str:
    """A hash of the prompt ids in file order: the sampler state in a checkpoint indexes into exactly these."""
    return hashlib.sha256("\x00".join(prompts.column("prompt_id").to_pylist()).encode()).hexdigest()[:16]


def begin(run_dir: str | os.PathLike, step: int) -> Path:
    """An empty temporary folder for the checkpoint after `step` steps (removes a leftover of a crash)."""
    tmp = checkpoints_dir(run_dir) / f".tmp-{step_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def commit(tmp: Path, state: dict, keep: int) -> Path:
    """Write state.json, move the folder into place, point `latest` at it, drop all but the newest `keep`."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    _fsync_tree(tmp)
    final = tmp.parent / tmp.name.removeprefix(".tmp-")
    if final.exists():  # the same step written again (a resumed run repeating it): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = tmp.parent / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, tmp.parent / "latest")
    for old in sorted(p for p in tmp.parent.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in tmp.parent.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else the highest complete step-* folder."""
    root = checkpoints_dir(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / STATE_FILE).is_file():
            return named
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def load_state(checkpoint: Path, cfg: RunConfig, prompts=None) -> dict:
    """The loop state of `checkpoint`; ConfigError if the config (or, given `prompts`, the prompt file) changed
    in a way the resume cannot carry."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"checkpoint {checkpoint}: unreadable {STATE_FILE} ({err})") from None
    if state.get("config_digest") != config_digest(cfg):
        raise ConfigError(f"checkpoint {checkpoint} was written with a different config: only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change on resume")
    if prompts is not None and state.get("prompts_digest") != prompts_digest(prompts):
        raise ConfigError(f"checkpoint {checkpoint}: the prompt file changed since it was written "
                          f"({len(state['sampler']['order'])} prompts then, {prompts.num_rows} now, or other ids)")
    if state["step"] > cfg.loop.num_steps:
        raise ConfigError(f"checkpoint {checkpoint} is at step {state['step']}, past loop.num_steps="
                          f"{cfg.loop.num_steps}")
    return state


def truncate_lines(path: Path, keep: int) -> None:
    """Keep the first `keep` lines of a JSONL file (what the steps before a checkpoint wrote)."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        lines = f.readlines()
    if len(lines) < keep:
        raise ConfigError(f"{path} has {len(lines)} lines, the checkpoint expects at least {keep}")
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.writelines(lines[:keep])
    os.replace(tmp, path)
