"""Checkpoint folders on disk: atomic commit, `latest`, pruning, a crash mid-write, and the resume checks."""
import json

import pyarrow as pa
import pytest

from rlaif_ray.config import ConfigError, load_config
from rlaif_ray.runtime import checkpoint


def prompts(ids):
    return pa.table({"prompt_id": ids, "prompt": [f"{i}?" for i in ids], "reference": [None] * len(ids)})


def write(run_dir, step, cfg, table, keep=2):
    tmp = checkpoint.begin(run_dir, step)
    (tmp / "policy.bin").write_bytes(b"w" * step)
    state = {"step": step, "config_digest": checkpoint.config_digest(cfg), "sampler": {"order": [0, 1, 2]},
             "prompts_digest": checkpoint.prompts_digest(table)}
    return checkpoint.commit(tmp, state, keep)


def test_commit_latest_prune_and_a_crash_mid_write(tmp_path):
    cfg, table = load_config(None, ["loop.num_steps=10"]), prompts(["a", "b", "c"])
    assert checkpoint.latest(tmp_path) is None
    for step in (2, 4, 6):
        write(tmp_path, step, cfg, table)
    root = checkpoint.checkpoints_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000004", "step-000006"]
    assert checkpoint.latest(tmp_path).name == "step-000006"
    # a crash while step 8 was being written: its folder is incomplete and never named by `latest`
    crashed = checkpoint.begin(tmp_path, 8)
    (crashed / "policy.bin").write_bytes(b"half")
    assert checkpoint.latest(tmp_path).name == "step-000006"
    # `latest` itself lost (crash between rename and pointer): the newest complete folder still wins
    (root / "latest").unlink()
    assert checkpoint.latest(tmp_path).name == "step-000006"
    write(tmp_path, 8, cfg, table)  # the next commit replaces the leftover
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000006", "step-000008"]
    assert (root / "step-000008" / "policy.bin").read_bytes() == b"w" * 8


def test_resume_checks_config_prompts_and_steps(tmp_path):
    cfg, table = load_config(None, ["loop.num_steps=10"]), prompts(["a", "b", "c"])
    folder = write(tmp_path, 4, cfg, table)
    # keys that may change: how long, where, what it survives
    ok = load_config(None, ["loop.num_steps=20", "output.run_dir=elsewhere", "fault.max_resumes=5"])
    assert checkpoint.load_state(folder, ok, table)["step"] == 4
    with pytest.raises(ConfigError, match="different config"):
        checkpoint.load_state(folder, load_config(None, ["loop.num_steps=10", "learner.kl_coef=0.2"]), table)
    with pytest.raises(ConfigError, match="prompt file changed"):
        checkpoint.load_state(folder, cfg, prompts(["a", "b", "x"]))
    with pytest.raises(ConfigError, match="past loop.num_steps=3"):
        checkpoint.load_state(folder, load_config(None, ["loop.num_steps=3"]), table)
    (folder / checkpoint.STATE_FILE).write_text("{broken")
    with pytest.raises(ConfigError, match="unreadable"):
        checkpoint.load_state(folder, cfg, table)


def test_truncate_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i}) + "\n" for i in range(5)))
    checkpoint.truncate_lines(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    with pytest.raises(ConfigError, match="expects at least 4"):
        checkpoint.truncate_lines(path, 4)


def test_checkpoints_are_due_by_steps_and_by_time():
    """checkpoint.every (steps) and checkpoint.every_minutes (after the first step that ends that long after the last
    checkpoint): by default a long run gets one every 30 minutes, a short one none."""
    from types import SimpleNamespace

    from rlaif_ray.runtime.orchestrator import Orchestrator
    now = [1000.0]

    def due(steps_done: list[int], **section) -> list[int]:
        driver = SimpleNamespace(cfg=load_config(None, [f"checkpoint.{k}={v}" for k, v in section.items()]),
                                 last_checkpoint=now[0])
        out = []
        for step in range(6):
            now[0] += steps_done[step]  # seconds the step took
            if Orchestrator.checkpoint_due(driver, step, now[0]):
                out.append(step + 1)
                driver.last_checkpoint = now[0]
        return out
    minutes = [60.0] * 6
    assert due(minutes) == []                                           # default: 6 minutes of steps, none
    assert due([600.0] * 6) == [3, 6]                                   # 10-minute steps: every 30 minutes
    assert due(minutes, every=2, every_minutes=0) == [2, 4, 6]
    assert due(minutes, every=4, every_minutes=2.5) == [3, 4]                # whichever comes first
