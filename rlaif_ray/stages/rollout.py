"""RolloutWorker: a Ray actor holding a vLLM engine with the current policy weights.

`generate` samples n responses per prompt (continuous batching: one `generate` call for the whole batch)
and returns an Arrow table in the `rollouts` schema, with token ids, per-token log-probs and the policy
version that generated every row. `update_weights` swaps all weights in one call between two `generate`
calls; the actor runs one method at a time, so a batch never sees half-loaded weights.

Group flow (`generate_groups`) can run several calls at once on one engine (`rollout.engine_streams`, the
"streams" concurrency group): their requests share the engine's continuous batch (rlaif_ray.stages.shared_engine),
and every other method takes the whole engine only once the requests in flight have finished (a weight update under
`rollout.in_flight_update: continue` takes it between two steps instead, and the requests in flight go on under the
new weights).
"""
from __future__ import annotations

import functools
import threading
import time
import warnings

import numpy as np
import pyarrow as pa
import ray

from rlaif_ray.config import RunConfig
from rlaif_ray.console import stage_output_to_run_folder
from rlaif_ray.data import schemas
from rlaif_ray.data.chat import engine_input, resolve_template
from rlaif_ray.data.checkers import make_checker
from rlaif_ray.data.transport import use_arrow_ipc
from rlaif_ray.engine import make_llm
from rlaif_ray.stages.shared_engine import BusyClock, SharedEngine
from rlaif_ray.weight_transfer import from_wire


def _sampled_logprobs(token_ids, logprobs) -> list[float]:
    if logprobs is None:
        return [float("nan")] * len(token_ids)
    return [float(step[tok].logprob) for tok, step in zip(token_ids, logprobs)]


def sampled_versions(sample, version: int) -> list[int]:
    """The policy version that sampled each of `sample`'s tokens, from the weight-version spans vLLM records per
    completion (`CompletionOutput.weight_versions`: the label the worker gave the engine with each update); every
    token `version` where the engine recorded none or the spans do not cover the tokens."""
    n = len(sample.token_ids)
    spans = getattr(sample, "weight_versions", None) or []
    try:
        out = [int(span.version) for span in spans for _ in range(span.end - span.start)]
    except ValueError:  # a label not ours ("default": the engine never got one)
        out = []
    return out if len(out) == n else [version] * n


MAX_ENGINE_STREAMS = 16  # rollout.engine_streams' ceiling: the "streams" group's size (fixed where the class is declared)


def _whole_engine(method):
    """The method uses the whole engine: it waits for the requests of concurrent group calls to finish (and holds new
    ones back) while it runs."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.shared.exclusive():
            return method(self, *args, **kwargs)
    return wrapper


@ray.remote(concurrency_groups={"streams": MAX_ENGINE_STREAMS})
class RolloutWorker:
    def __init__(self, model_path: str, cfg: dict, worker_index: int = 0):
        use_arrow_ipc()  # tables in and out as one IPC buffer each (rlaif_ray.data.transport)
        self.cfg = RunConfig.model_validate(cfg)
        stage_output_to_run_folder(self.cfg, f"rollout-{worker_index}")  # output.console=quiet: logs to run_dir/logs
        self.model_path = model_path
        self.worker_index = worker_index
        # the log-probs returned are those of the distribution sampled from (temperature, top-p applied): the learner's
        # importance ratios compare against exactly that
        self.llm = make_llm(model_path, self.cfg.engine_for("rollout"), seed=self.cfg.loop.seed + worker_index,
                            logprobs_mode="processed_logprobs")
        self.tokenizer = self.llm.get_tokenizer()
        self.shared = SharedEngine(self.llm)  # group calls running at once (rollout.engine_streams > 1) ...
        self.stream_slots = threading.BoundedSemaphore(self.cfg.rollout.engine_streams)  # ... at most this many
        self.busy = BusyClock()  # the group calls' busy time, overlapping calls counted once
        self.template = resolve_template(self.cfg.rollout.chat_template, self.tokenizer)  # None: plain prompt text
        self._take_version(0)  # self.version; -1: a collective sync broke off midway, the weights are incomplete
        self.sync_generation = None  # the sync group this engine's workers belong to (rlaif_ray.weight_transfer)
        self.pulling = threading.Lock()  # sync.delivery=pull: one group call loads a version, those beside it wait

    def _take_version(self, version: int) -> None:
        """The policy version of the engine's weights now; vLLM labels every token it samples from here on with it
        (the rollouts' `token_versions`). Called only between two engine steps."""
        self.version = version
        self.llm.llm_engine.set_weight_version(str(version))

    def _engine_inputs(self, rows: list[dict]) -> list:
        """What the engine gets for each prompt row (rlaif_ray.data.chat): text, or the chat template's token ids."""
        return [engine_input(self.tokenizer, row, self.template) for row in rows]

    def ready(self) -> int:
        return self.version

    def inject_fault(self, kind: str, seconds: float) -> None:
        """Chaos hook (tests, drills): the next `generate` ("hang_generate") or the next collective weight sync
        ("hang_sync") first sleeps `seconds`, as an engine that is alive but does not answer; "pause_mid_generation":
        the next group call stops stepping after its first engine step until a weight update has come (at most
        `seconds`), so the update lands in the middle of its responses."""
        if kind == "pause_mid_generation":
            before = self.version

            def pause() -> None:
                deadline = time.monotonic() + seconds
                while self.version == before and time.monotonic() < deadline:
                    time.sleep(0.005)
            self.shared.after_step = pause
            return
        if kind not in ("hang_generate", "hang_sync"):
            raise ValueError(f"unknown fault {kind!r}: hang_generate, hang_sync or pause_mid_generation")
        self._injected = {kind: seconds}

    def _injected_pause(self, kind: str) -> None:
        seconds = getattr(self, "_injected", {}).pop(kind, 0)
        if seconds:
            time.sleep(seconds)

    @_whole_engine
    def score(self, token_ids: list[list[int]]) -> list[list[float]]:
        """log π(x_t | x_<t) for t >= 1 of each sequence under the engine's current weights (its own distribution):
        what a sync is checked with, against the learner's `score`."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_ids],
                                 SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0), use_tqdm=False)
        return [[float(step[tok].logprob) for tok, step in zip(ids[1:], out.prompt_logprobs[1:])]
                for ids, out in zip(token_ids, outs)]

    def _requests(self, prompts: pa.Table, indices: list[int], step: int, positions: list[int]) -> tuple[list[dict], list]:
        """The prompt rows of `indices` and one SamplingParams each: `rollout.samples_per_prompt` samples, seeded by
        the prompt's position in its batch (`positions[i]`), so a batch samples the same however it is split."""
        from vllm import SamplingParams

        r = self.cfg.rollout
        rows = prompts.take(pa.array(indices, pa.int64())).to_pylist()
        params = [SamplingParams(n=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p,
                                 max_tokens=r.max_new_tokens, logprobs=0,
                                 seed=self.cfg.loop.seed * 1_000_003 + step * 10_007 + position)
                  for position in positions]
        return rows, params

    def _group(self, step: int, row: dict, out) -> list:
        """One prompt's samples as `_rollout_table` takes them."""
        return [(schemas.sample_id(step, row["prompt_id"], k), k, row, out, sample)
                for k, sample in enumerate(out.outputs)]

    def _gen_stats(self, t_start: float, engine_seconds: float, samples: list) -> dict:
        """The stats of a generate call (either kind) that produced `samples`."""
        return {"gen_seconds": time.perf_counter() - t_start, "engine_seconds": engine_seconds,
                "gen_tokens": sum(len(sample.token_ids) for *_, sample in samples), "gen_samples": len(samples),
                "policy_version": self.version, "worker": self.worker_index}

    @_whole_engine
    def generate(self, prompts: pa.Table, indices: list[int], step: int, first: int = 0) -> tuple[pa.Table, dict]:
        """Sample `rollout.samples_per_prompt` responses for prompts[indices]; `step` names the batch, `first` is the
        position of indices[0] in it (a shard's offset: each prompt's sampling seed follows its batch position)."""
        self._injected_pause("hang_generate")
        t_start = time.perf_counter()
        rows, params = self._requests(prompts, indices, step, list(range(first, first + len(indices))))
        t0 = time.perf_counter()
        outputs = self.llm.generate(self._engine_inputs(rows), params, use_tqdm=False)
        engine_seconds = time.perf_counter() - t0
        samples = [x for row, out in zip(rows, outputs) for x in self._group(step, row, out)]
        return self._rollout_table(samples), self._gen_stats(t_start, engine_seconds, samples)

    def generate_groups(self, prompts: pa.Table, indices: list[int], step: int, positions: list[int],
                        min_version: int = 0, published: tuple[int, list] | None = None):
        """`generate` one prompt group at a time (loop.flow: groups): a Ray generator that yields, for each prompt group
        the moment vLLM finishes its last sample, its `rollouts` table and then a small dict naming it (`position`:
        its prompt's position in the batch, `version`, `tokens`, `samples`, `seconds` since the call started), so
        the driver knows which group a table is without fetching it; the last group's dict carries the call's stats
        too (`closing`).
        The shard's prompts are batched together as in `generate`, with the same seeds (`positions[i]` is
        indices[i]'s position in its batch), so the samples are the same. Call it with
        `.options(num_returns="streaming")`, and `concurrency_group="streams"` to run it beside other group calls
        (their requests batched together in the engine; the group's version is the one its requests started under).
        `min_version`: the version the driver had sent when it made the call; a call that runs beside a weight update
        waits for it (at most `sync.timeout_s`), as a call queued behind the update would. `published` (sync.delivery=
        pull): (version, [weights ref]) of the last version published; an engine that holds an older one loads it
        first (the load's receipt comes back in the call's stats, as `sync`)."""
        self._injected_pause("hang_generate")
        t_start = time.perf_counter()
        rows, params = self._requests(prompts, indices, step, positions)
        with self.stream_slots:
            pulled = self._pull(published)
            deadline = time.monotonic() + self.cfg.sync.timeout_s
            while self.version < min_version and time.monotonic() < deadline:  # else the driver sees a stale group
                time.sleep(0.005)
            with self.busy.call():  # its requests in the engine
                ids, inbox, version = self.shared.add(self._engine_inputs(rows), params, on_added=lambda: self.version)
                waiting = {rid: (row, pos) for rid, row, pos in zip(ids, rows, positions)}
                samples, done = [], []
                while waiting:
                    try:
                        out = self.shared.next_finished(inbox)
                    except RuntimeError:  # a request vLLM never finished: the call fails rather than leave a group out
                        raise RuntimeError(f"rollout worker {self.worker_index}: {len(waiting)} prompt groups of step "
                                           f"{step} never finished") from None
                    row, position = waiting.pop(out.request_id)
                    group = self._group(step, row, out)
                    samples += group
                    done.append(time.perf_counter() - t_start)
                    yield self._rollout_table(group, version)
                    name = {"position": position, "version": version, "samples": len(group), "seconds": done[-1],
                            "tokens": sum(len(sample.token_ids) for *_, sample in group), "worker": self.worker_index}
                    if not waiting:  # the last group's name carries the call's stats (no item, no wake-up of their own)
                        name["closing"] = {**self._gen_stats(t_start, done[-1], samples), "policy_version": version,
                                           "group_seconds": done, "busy_seconds": self.busy.take(),
                                           **({"sync": pulled} if pulled else {})}
                    yield name

    def load_published(self, published: tuple[int, list]) -> dict | None:
        """sync.delivery=pull: the published version loaded now if this engine holds an older one (before the
        evaluation after a run: no group call may have named the last version)."""
        return self._pull(published)

    def _pull(self, published: tuple[int, list] | None) -> dict | None:
        """sync.delivery=pull: the published version loaded if this engine holds an older one (its receipt), as an
        update the driver sent would be (`update_weights`: requests of the calls beside it finish first, or continue)."""
        if published is None or self.version >= published[0]:
            return None
        with self.pulling:
            if self.version >= published[0]:  # a call beside this one loaded it meanwhile
                return None
            return self.update_weights(ray.get(published[1][0]), published[0])

    @_whole_engine
    def respond(self, prompts: pa.Table, temperature: float, tag: str) -> pa.Table:
        """One response per prompt (greedy at temperature 0, else seeded), sample ids `tag/prompt_id`."""
        from vllm import SamplingParams

        rows = prompts.to_pylist()
        params = [SamplingParams(temperature=temperature, max_tokens=self.cfg.rollout.max_new_tokens, logprobs=0,
                                 seed=self.cfg.loop.seed + i) for i in range(len(rows))]
        outs = self.llm.generate(self._engine_inputs(rows), params, use_tqdm=False)
        return self._rollout_table([(f"{tag}/{row['prompt_id']}", 0, row, out, out.outputs[0])
                                    for row, out in zip(rows, outs)])

    def _rollout_table(self, samples: list, version: int | None = None) -> pa.Table:
        """A `rollouts` table from (sample id, index in its group, prompt row, vLLM request output, completion);
        `version`: the policy version they were generated under (default: the engine's now)."""
        version = self.version if version is None else version
        cols: dict[str, list] = {f.name: [] for f in schemas.ROLLOUT_SCHEMA}
        for sid, k, row, out, sample in samples:
            ids = list(sample.token_ids)
            for key, value in (("sample_id", sid), ("prompt_id", row["prompt_id"]), ("group_index", k),
                               ("prompt", row["prompt"]), ("prompt_token_ids", list(out.prompt_token_ids)),
                               ("response", sample.text), ("response_token_ids", ids),
                               ("response_logprobs", _sampled_logprobs(ids, sample.logprobs)),
                               ("finish_reason", sample.finish_reason), ("policy_version", version),
                               ("token_versions", sampled_versions(sample, version)), ("reference", row["reference"])):
                cols[key].append(value)
        return schemas.validate(pa.Table.from_pydict(cols, schema=schemas.ROLLOUT_SCHEMA), "rollouts")

    @_whole_engine
    def evaluate(self, prompts: pa.Table, samples: int) -> dict:
        """Ground-truth accuracy on every prompt with a reference: `samples` draws at the rollout temperature
        (seeded) and one greedy answer each. Empty when no prompt has a reference."""
        from vllm import SamplingParams

        rows = [r for r in prompts.select(["prompt", "reference", "messages"]).to_pylist() if r["reference"] is not None]
        if not rows:
            return {}
        r = self.cfg.rollout
        texts = self._engine_inputs(rows)
        sampled = self.llm.generate(texts, [SamplingParams(n=samples, temperature=r.temperature, top_p=r.top_p,
                                                           max_tokens=r.max_new_tokens, seed=self.cfg.loop.seed + i)
                                            for i in range(len(rows))], use_tqdm=False)
        greedy = self.llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=r.max_new_tokens), use_tqdm=False)
        is_correct = make_checker(self.cfg.data.checker)
        hits = [sum(is_correct(o.text, row["reference"]) for o in out.outputs) for row, out in zip(rows, sampled)]
        greedy_hits = [int(is_correct(out.outputs[0].text, row["reference"])) for row, out in zip(rows, greedy)]
        return {"accuracy_sampled": sum(hits) / (samples * len(rows)),
                "accuracy_greedy": sum(greedy_hits) / len(rows),
                "prompts": len(rows), "samples_per_prompt": samples, "policy_version": self.version,
                "sampled_hits": hits, "greedy_hits": greedy_hits}  # per prompt, in the file's order: win rates

    def _loading_weights(self, in_flight: str | None):
        """The engine between two steps for new weights: the requests in flight of concurrent group calls either
        finish first (`rollout.in_flight_update: finish`) or go on under the new weights (`continue`); `in_flight`
        overrides the setting for one call."""
        if (in_flight or self.cfg.rollout.in_flight_update) == "continue":
            return self.shared.between_steps()
        return self.shared.exclusive()

    def update_weights(self, weights: tuple[list[np.ndarray], list[str]], version: int,
                       in_flight: str | None = None) -> dict:
        """Load a whole new set of weights (one array per parameter + names, as the learner exports them: an int16
        array holds bfloat16 bits) and take its version. The tensors stay in host memory; the worker copies them to
        its device one at a time as vLLM loads them."""
        arrays, names = weights
        with warnings.catch_warnings():  # the object store hands out read-only arrays; we only read them
            warnings.simplefilter("ignore", UserWarning)
            tensors = [from_wire(a) for a in arrays]
        with self._loading_weights(in_flight):
            t0 = time.perf_counter()
            self.llm.collective_rpc("rlaif_load_weights", args=(tensors, names))
            self._fresh_cache()
            self._take_version(version)
        return {"ok": True, "method": "object_store", "sync_seconds": time.perf_counter() - t0,
                "sync_bytes": int(sum(a.nbytes for a in arrays)), "version": version, "worker": self.worker_index}

    def receive_weights(self, version: int, spec: dict, first_rank: int, in_flight: str | None = None) -> dict:
        """Take version `version` over the collective sync group `spec` (joined first when it is a new
        generation; this engine's workers are ranks first_rank, first_rank+1, ...). The version is taken only
        once every bucket arrived; a transfer that breaks off midway leaves version -1 (incomplete weights: the
        driver gives this engine the whole version through the object store before it is used). Failures are
        returned, not raised."""
        with self._loading_weights(in_flight):
            return self._receive_weights(version, spec, first_rank)

    def _receive_weights(self, version: int, spec: dict, first_rank: int) -> dict:
        from rlaif_ray.weight_transfer import layout_bytes

        self._injected_pause("hang_sync")
        t0 = time.perf_counter()
        try:
            group = (spec["host"], spec["port"], spec["generation"])  # a new driver's generation 1 is another group
            if self.sync_generation != group:
                self.sync_generation = None
                self.llm.collective_rpc("rlaif_join_sync_group", args=(spec, first_rank))
                self.sync_generation = group
        except Exception as err:
            return {"ok": False, "error": f"engine {self.worker_index} did not join sync group {spec['generation']}: "
                                          f"{type(err).__name__}: {str(err)[:300]}", "worker": self.worker_index}
        t_joined = time.perf_counter()
        previous = self.version
        self._take_version(-1)
        try:
            waits = self.llm.collective_rpc("rlaif_receive_weights")
        except Exception as err:
            self.sync_generation = None
            return {"ok": False, "error": f"engine {self.worker_index} lost version {version} midway (it held "
                                          f"{previous}): {type(err).__name__}: {str(err)[:300]}",
                    "worker": self.worker_index}
        self._fresh_cache()
        self._take_version(version)
        total = time.perf_counter() - t0
        return {"ok": True, "method": "collective", "sync_seconds": total, "join_seconds": t_joined - t0,
                "transfer_seconds": max(waits), "load_seconds": total - (t_joined - t0) - max(waits),
                "sync_bytes": layout_bytes(spec["layout"]), "version": version, "worker": self.worker_index}

    def _fresh_cache(self) -> None:
        """After new weights: no KV computed by the old ones is used again (requests in flight under
        `in_flight_update: continue` are preempted and recomputed, keeping their tokens)."""
        self.llm.reset_prefix_cache(reset_running_requests=self.llm.llm_engine.has_unfinished_requests())

    @_whole_engine
    def sleep(self) -> None:
        """learner.colocate: free this engine's GPU memory for the learners' step (weights offloaded to host memory,
        KV cache dropped; vLLM sleep mode level 1)."""
        self.llm.sleep(level=1)

    @_whole_engine
    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take GPU memory back: ["weights"] before the new weights arrive, ["kv_cache"] after them (then
        generation may start), None both."""
        self.llm.wake_up(tags)
        if tags is None or "kv_cache" in tags:
            self.llm.reset_prefix_cache()

    def engine_ranks(self) -> int:
        """How many sync-group ranks this engine's workers take (its tensor-parallel size)."""
        return int(self.llm.llm_engine.vllm_config.parallel_config.world_size)
