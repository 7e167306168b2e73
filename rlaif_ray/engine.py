"""Starting a vLLM engine inside a Ray actor, and loading new weights into it in place.

On CPU the engine runs in the actor's own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, executor "uni"):
start-up is ~11 s instead of ~29 s, and tensors reach the worker as tensors, not msgpack lists. A tensor-parallel
engine (TP > 1) keeps its engine core in the actor and runs one worker process per shard (executor "mp", spawned)
or Ray workers ("ray"). Settings per engine role: `RunConfig.engine_for` (rlaif_ray.config.EngineSettings).
"""
from __future__ import annotations

import os

import torch

from rlaif_ray.config import EngineSettings


def eager(settings: EngineSettings) -> bool:
    """`enforce_eager` as set, else (None) eager only where there are no CUDA graphs: on the CPU backend."""
    return settings.enforce_eager if settings.enforce_eager is not None else not settings.on_gpu()


def engine_env(settings: EngineSettings) -> dict[str, str]:
    """Environment a process needs before `import vllm` (also used as a Ray runtime_env). CPU-backend variables only
    for engines whose actor holds no GPU (decided from the config, not from the machine that computes it: a
    driver on a GPU-less head node used to give GPU engines the CPU backend's variables)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    if settings.executor == "mp":
        env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"  # never fork a Ray worker
    if not settings.on_gpu():
        env.update(cpu_backend_env(settings.cpu_kvcache_space_gib, eager(settings)))
        if settings.tensor_parallel_size > 1:  # vLLM's auto binding wants one NUMA node per shard; leave it to the OS
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return env


def cpu_backend_env(kvcache_space_gib: float, eager_engine: bool) -> dict[str, str]:
    """What a vLLM engine on the CPU backend needs in its environment before vLLM is imported (the loop's engines
    through `engine_env`, a served CPU replica through its runtime_env)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kvcache_space_gib)}  # its KV cache, not gpu_memory_utilization
    if eager_engine:
        # vLLM torch.compiles a few helpers whatever enforce_eager says (the rank count behind the sampler's
        # gather_logprobs, among others): on a CPU engine the first call that read log-probs compiled them with
        # inductor, 3-6 s in every engine process (the first rollout and the first judge call of each run), to
        # save microseconds per step. Read when vLLM is imported (torch.compile then gives back the plain
        # function), so it must be in the environment before that: an eager CPU engine runs them as plain torch.
        env["TORCHDYNAMO_DISABLE"] = "1"
    return env


def make_llm(model_path: str, settings: EngineSettings, seed: int, logprobs_mode: str = "raw_logprobs"):
    """A `vllm.LLM` for `model_path` whose workers can take new weights (see WeightUpdateExtension).
    `logprobs_mode`: "raw_logprobs" (the model's own distribution: what a judge reads) or "processed_logprobs"
    (after temperature and top-p: the distribution a rollout sampled from, which the learner's ratios need)."""
    for key, value in engine_env(settings).items():
        os.environ.setdefault(key, value)
    from vllm import LLM

    return LLM(
        model=model_path,
        tokenizer=model_path,
        dtype=settings.dtype,
        seed=seed,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enforce_eager=eager(settings),
        max_num_seqs=settings.max_num_seqs,
        max_logprobs=settings.max_logprobs,
        tensor_parallel_size=settings.tensor_parallel_size,
        distributed_executor_backend=settings.executor,
        worker_extension_cls="rlaif_ray.engine.WeightUpdateExtension",
        enable_prefix_caching=True,
        logprobs_mode=logprobs_mode,
        **({"enable_sleep_mode": True} if settings.sleep_mode else {}),  # CUDA only (config refuses it on CPU)
    )


class WeightUpdateExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`); called through `LLM.collective_rpc`."""

    def rlaif_load_weights(self, tensors: list[torch.Tensor], names: list[str]) -> int:
        if len(tensors) != len(names):
            raise ValueError(f"weight update holds {len(tensors)} tensors for {len(names)} names")
        device = self._rlaif_device()
        # a generator: one tensor at a time goes to the device as vLLM loads it (never the whole model at once
        # beside the engine's own weights and KV cache, issue 26)
        self._rlaif_reload((name, t.to(device)) for name, t in zip(names, tensors))
        return len(names)

    def _rlaif_device(self):
        return self.model_runner.device if hasattr(self.model_runner, "device") else "cpu"

    def _rlaif_reload(self, weights) -> None:
        """vLLM's in-place reload from (HF name, tensor) pairs (any iterable: it is consumed as it goes), then the
        tied output head made whole again."""
        reload = getattr(self, "reload_weights", None) or self.model_runner.reload_weights  # worker wraps the config context
        reload(weights_iterator=weights)
        self._rlaif_retie_embeddings()

    def _rlaif_retie_embeddings(self) -> None:
        """A model with tied input and output embeddings (SmolLM2, Qwen2.5 up to 3B, Llama-3.2 1B/3B) has no
        lm_head weight in its checkpoint; vLLM's layerwise reload loads the input embedding and puts the output
        head's old kernel tensors back (on CPU its packed GEMM), so the head would keep computing logits with the
        initial weights for the rest of the run. Tie it again to the newly loaded embedding and rebuild its kernel,
        as vLLM does when it builds the model."""
        hf_config = self.model_runner.model_config.hf_config
        if not getattr(hf_config, "tie_word_embeddings", False):
            return
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

        model = self.model_runner.get_model()
        heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
        embeds = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
        if len(heads) == 1 and len(embeds) == 1 and heads[0].weight.shape == embeds[0].weight.shape:
            head = heads[0]
            head.weight = embeds[0].weight
            head.quant_method.process_weights_after_loading(head)  # CPU: the head's packed GEMM from the new weight

    def rlaif_join_sync_group(self, spec: dict, first_rank: int) -> int:
        """Join the collective sync group (rlaif_ray.weight_transfer) as `first_rank` + this worker's rank in its
        engine (its tensor-parallel shard); a previous group is closed first."""
        from rlaif_ray.weight_transfer import GroupSpec, open_group

        old = getattr(self, "rlaif_sync_group", None)
        if old is not None:
            old.close()
            self.rlaif_sync_group = None
        rank = first_rank + int(getattr(self, "rank", 0))
        self.rlaif_sync_group = open_group(GroupSpec(**spec), rank)
        return rank

    def rlaif_receive_weights(self) -> float:
        """Receive one whole version over the sync group, loading each bucket into the engine as it arrives.
        Returns the seconds spent waiting in the broadcasts (the rest of the call is vLLM loading the weights)."""
        group = self.rlaif_sync_group
        self._rlaif_reload(group.receive(self._rlaif_device()))
        return group.wait_seconds
