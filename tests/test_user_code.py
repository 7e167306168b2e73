"""The user's own Python: reward functions and services beside the judge (`reward.functions`), checkers and rewards
named by file or found in the working folder, shipped to the actors (rlaif_ray.user_code)."""
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import ray

from rlaif_ray.config import ConfigError, load_config
from rlaif_ray.stages.reward_functions import RewardFunctionError

ROOT = Path(__file__).resolve().parents[1]
REWARDS = '''
def short(prompts, responses, references):
    """1 for a response of at most 2 characters, else 0; no opinion on 0+9."""
    return [None if p.startswith("0+9") else float(len(r.strip()) <= 2) for p, r in zip(prompts, responses)]


def fails_on_sevens(prompts, responses, references):
    return [1.0 / (0 if "7" in p else 1) for p in prompts]


def one_too_few(prompts, responses, references):
    return [0.0] * (len(prompts) - 1)


def not_a_number(prompts, responses, references):
    return ["high"] * len(prompts)
'''


@pytest.fixture
def labelled_batch(engines, prompts_ref):
    rollouts, _ = engines["rollout"].generate.options(num_returns=2).remote(prompts_ref, [3, 9, 17, 70], 5)
    labels, _ = engines["critic"].label.options(num_returns=2).remote(rollouts)
    return labels


@pytest.fixture
def prompts_ref(ray_cluster, toy_world):
    from rlaif_ray.data.prompts import load_prompts
    return ray.put(load_prompts(toy_world.prompts))


class RewardService(BaseHTTPRequestHandler):
    """A reward service: 503 on its first request (retried), then 0.25 per response character."""
    calls = 0

    def do_POST(self):  # noqa: N802 (http.server's name)
        RewardService.calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if RewardService.calls == 1:
            self.send_response(503)
            self.end_headers()
            return
        reply = json.dumps({"rewards": [0.25 * len(r) for r in body["responses"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_reward_functions_and_a_service_add_to_the_judges_reward(labelled_batch, tmp_path):
    from rlaif_ray.stages.reward import RewardScorer
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    server = HTTPServer(("127.0.0.1", 0), RewardService)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/reward"
    functions = [{"function": f"{tmp_path}/my_rewards.py:short", "weight": 0.5},
                 {"url": url, "name": "length", "weight": -1.0, "timeout_s": 10, "max_retries": 2}]
    judge_only, with_functions = RewardScorer.remote("win_rate"), RewardScorer.remote("win_rate", functions=functions)
    try:
        base, _ = ray.get(judge_only.score.remote(labelled_batch))
        table, stats = ray.get(with_functions.score.remote(labelled_batch))
    finally:
        server.shutdown()
    rows, judge = table.to_pylist(), base.column("reward").to_pylist()
    assert RewardService.calls == 2  # the 503 was retried
    for row, j in zip(rows, judge):
        short = None if row["prompt"].startswith("0+9") else float(len(row["response"].strip()) <= 2)
        expected = None if j is None else j + 0.5 * (short or 0.0) - 0.25 * len(row["response"])
        assert row["reward"] == pytest.approx(expected, abs=1e-5)
    shorts = [float(len(r["response"].strip()) <= 2) for r in rows if not r["prompt"].startswith("0+9")]
    assert stats["reward_short"] == pytest.approx(sum(shorts) / len(shorts))
    assert stats["reward_length"] == pytest.approx(sum(0.25 * len(r["response"]) for r in rows) / len(rows))
    assert stats["reward_win_rate"] == pytest.approx(sum(x for x in judge if x is not None) /
                                                     sum(x is not None for x in judge), abs=1e-6)


@pytest.mark.parametrize("name, message", [
    ("fails_on_sevens", r"reward.functions\[0\] \(fails_on_sevens\) raised ZeroDivisionError: .*on sample \S+ "
                        r"\(prompt '[^']*7"),
    ("one_too_few", r"reward.functions\[0\] \(one_too_few\) returned 7 rewards for a batch of 8 samples"),
    ("not_a_number", r"reward.functions\[0\] \(not_a_number\) gave 'high' for sample"),
])
def test_a_reward_function_that_fails_names_itself_and_the_sample(labelled_batch, tmp_path, name, message):
    from rlaif_ray.stages.reward import RewardScorer
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    scorer = RewardScorer.remote("win_rate", functions=[{"function": f"{tmp_path}/my_rewards.py:{name}", "weight": 1}])
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(scorer.score.remote(labelled_batch))
    assert isinstance(err.value.cause, RewardFunctionError)
    assert re.search(message, str(err.value.cause)), str(err.value.cause)


def test_user_code_is_found_in_the_working_folder_and_shipped(tmp_path, monkeypatch):
    from rlaif_ray.runtime.inputs import check_user_code
    (tmp_path / "beside_data.py").write_text("def always(response, reference):\n    return True\n")
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    cfg = load_config(None, ["data.checker=beside_data:always", "reward.functions=[my_rewards.py:short]"])
    check_user_code(cfg)
    assert cfg.reward.functions[0].function == f"{tmp_path}/my_rewards.py:short"  # actors run in other folders
    assert cfg.ray.py_modules == [str(tmp_path / "beside_data.py"), str(tmp_path / "my_rewards.py")]

    # start_ray gives every actor a copy, imported by the module's own name: a driver in another folder, whose
    # workers see neither tmp_path nor its files, on its own embedded cluster
    script = ("import importlib, ray\n"
              "from rlaif_ray.config import load_config\n"
              "from rlaif_ray.runtime.driver import start_ray\n"
              f"cfg = load_config(None, ['ray.num_cpus=1', {'ray.py_modules=' + json.dumps(cfg.ray.py_modules)!r}])\n"
              "start_ray(cfg)\n"
              "print('SHIPPED', ray.get(ray.remote(lambda: importlib.import_module('beside_data').__file__).remote()))\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    shipped = next((ln.split(" ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("SHIPPED ")), None)
    assert shipped, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert Path(shipped).name == "beside_data.py" and Path(shipped).parent != tmp_path
    for bad, field in (["data.checker=nowhere_at_all:fn"], "data.checker"), \
                      (["reward.functions=[my_rewards.py:absent]"], r"reward.functions\[0\].function"), \
                      (["reward.functions=[missing.py:f]"], r"reward.functions\[0\].function"):
        with pytest.raises(ConfigError, match=field):
            check_user_code(load_config(None, bad))
    for modname in ("beside_data", "my_rewards"):
        sys.modules.pop(modname, None)


def test_a_run_with_a_checker_and_a_reward_beside_the_data_needs_no_pythonpath(toy_world, tmp_path):
    """`rlaif-ray train` from the folder that holds the user's files, on its own embedded cluster, PYTHONPATH unset:
    the checker (every answer right) gives the accuracy the learner logs, the reward function its own metric."""
    (tmp_path / "mycheck.py").write_text("def always(response, reference):\n    return True\n")
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"RAY_AUTH_MODE": "disabled"}
    cli = Path(sys.executable).parent / "rlaif-ray"
    proc = subprocess.run(
        [str(cli), "train", "-c", str(ROOT / "jobs/configs/toy_cpu.yaml"), "data.checker=mycheck:always",
         "reward.functions=[{function: my_rewards.py:short, weight: 0.5}]", "loop.num_steps=2",
         "data.prompts_per_step=4", "rollout.samples_per_prompt=2", "loop.eval_samples=0", "learner.num_learners=1",
         "output.progress=false", "output.run_dir=run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rlaif: finished 2 steps" in proc.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["true_accuracy"] == 1.0 for m in metrics)
    assert all(0 <= m["reward_short"] <= 1 and "reward_win_rate" in m for m in metrics)
