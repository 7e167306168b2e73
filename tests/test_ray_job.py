"""The Ray-job path (README, docs/clusters.md), literally: a real head node started with `ray start --head` on 127.0.0.1 (auth mode
set explicitly), a short toy training run submitted through `JobSubmissionClient` with the repo as working_dir,
its logs followed until it succeeds, and the run folder checked; then the head it started is stopped (only it:
`ray start --block` owns its processes, so no `ray stop` that would hit other clusters on this machine)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    port, dashboard = free_port(), free_port()
    log = open(tmp_path_factory.mktemp("head") / "ray_start.log", "w")
    # its own temp dir: `ray start` records itself in <temp dir>/ray_current_cluster, where a later plain
    # `ray.init()` on this machine would find it (and fail) once this head is gone; short path for the sockets
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    proc = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard}", "--num-cpus=8", "--disable-usage-stats",
                             f"--temp-dir={temp_dir}",
                             # free ports for the head's agents: the test session's own cluster already holds the
                             # defaults (52365 ...), and a job agent that cannot bind never comes up
                             *(f"--{flag}={free_port()}" for flag in (
                                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                                 "runtime-env-agent-port", "ray-client-server-port"))],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    from ray.job_submission import JobSubmissionClient
    address = f"http://127.0.0.1:{dashboard}"
    client, deadline = None, time.monotonic() + 120
    while client is None:
        if proc.poll() is not None:
            pytest.fail(f"ray start --head exited with {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
        try:
            client = JobSubmissionClient(address)
        except Exception:  # the dashboard is not up yet
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the head's dashboard did not come up at {address}")
            time.sleep(1.0)
    yield {"client": client, "address": address, "env": env}
    os.killpg(proc.pid, 15)  # SIGTERM to `ray start --block` and the processes it started
    try:  # a graceful stop took ~34 s (its processes one after another): what is left after a few s is killed
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert not Path("/tmp/ray/ray_current_cluster").exists() or \
        f":{port}" not in Path("/tmp/ray/ray_current_cluster").read_text(), "the head left itself as the current cluster"


def test_submit_a_training_job_and_follow_it(head_node, tmp_path, toy_world):
    from ray.job_submission import JobStatus

    client = head_node["client"]
    run_dir = tmp_path / "job_run"
    steps = 3
    # the user's checker beside their data, outside the job's working_dir: the driver ships it to the actors
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mycheck.py").write_text("def always(response, reference):\n    return True\n")
    entrypoint = (f"python jobs/train.py -c jobs/configs/toy_cpu.yaml ray.address=auto loop.num_steps={steps} "
                  f"data.prompts_per_step=4 rollout.samples_per_prompt=2 loop.eval_samples=0 output.progress=false "
                  f"output.run_dir={run_dir} data.checker={tmp_path}/data/mycheck.py:always")
    job_id, deadline = None, time.monotonic() + 120
    while job_id is None:  # the dashboard answers before the head's job agent is up: "No available agent ..."
        try:
            job_id = client.submit_job(entrypoint=entrypoint,
                                       runtime_env={"working_dir": str(ROOT), "env_vars": {"RAY_AUTH_MODE": "disabled"}})
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)
    deadline, status = time.monotonic() + 480, None
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2.0)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}:\n{logs[-4000:]}"
    assert "rlaif-ray: error" not in logs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_version"] == steps and summary["generated"] == steps * 4 * 2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["true_accuracy"] for m in metrics] == [1.0] * steps  # the learner graded with the user's checker
    assert "rlaif: finished 3 steps" in logs  # the console summary, in the job's logs
    assert (run_dir / "checkpoint" / "config.json").is_file() and (run_dir / "report.md").is_file()
    info = client.get_job_info(job_id)
    assert info.entrypoint == entrypoint
