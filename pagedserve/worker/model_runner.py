"""SchedulerOutput -> input tensors -> model -> sampler -> ModelRunnerOutput.

The runner keeps a small state per running request (its tokens, block table and sampling
parameters) so that the scheduler only sends diffs. Inputs of one step, for B requests packed
back to back (T tokens in all):

    input_ids, positions, slot_mapping : [T]
    query_start_loc                    : [B+1]   request i's tokens are [qsl[i], qsl[i+1])
    seq_lens                           : [B]     context after this step = computed + scheduled
    block_tables                       : [B, max_blocks], padded with 0

A step is launch(plan) -> StepHandle, then collect(handle) -> ModelRunnerOutput. When every request
the step samples is plain greedy and none wants prompt logprobs, launch only enqueues the work: the
sampled ids stay on the device (and are copied to a pinned host buffer behind a CUDA event) until
collect. The engine may launch step n+1 in between (async scheduling); a request's input at the
position of its token from step n (a "placeholder", not yet known on the host) is then taken on
the device from step n's sampled ids:

    host input_ids   [t0, t1, 0, t3]          0 where the placeholder goes
    device           input_ids[2] = sampled_n[row of that request in step n]   (before the forward)

Any other step samples at launch, as a synchronous step always did; it first waits for a step
still in flight, so that tokens reach each request's state in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedserve.config import EngineConfig
from pagedserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagedserve.core.request import token_slice
from pagedserve.distributed.sampling import make_sampler
from pagedserve.model_executor.layers.attention import AttentionMetadata
from pagedserve.model_executor.layers.context import ParallelGroup
from pagedserve.model_executor.loader import load_model, resolve_dtype
from pagedserve.sampling_params import SamplingParams, SamplingType
from pagedserve.structured_output import GrammarCompilerCache
from pagedserve.worker.cpu_resources import (
    check_host_pools_fit,
    cpu_kv_cache_blocks,
    mem_available_bytes,
    module_bytes,
)
from pagedserve.worker.cuda_graphs import DecodeGraphs, DecodeResult
from pagedserve.worker.kv_cache import (
    KVCacheSpec,
    allocate_kv_cache,
    log_kv_pools,
    move_blocks,
    num_blocks_from_budget,
    profile_gpu_kv_budget,
)
from pagedserve.worker.sampler import SamplingMetadata, compute_prompt_logprobs

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio odd constant, spreads (seed, step) pairs


@dataclass(slots=True)
class RequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_id: int | None
    generator: torch.Generator | None = field(default=None)
    # Greedy with nothing that edits logits or reads them (no logprobs, bias, min_tokens,
    # penalties, structured outputs): the decode graph's argmax is this request's token.
    plain_greedy: bool = False
    grammar: Any = None  # xgrammar GrammarMatcher of a structured-output request
    num_pending: int = 0  # sampled by a launched step, not yet collected (0 or 1)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        return token_slice(self.prompt_token_ids, self.output_token_ids, start, end)

    def token_at(self, index: int) -> int:
        prompt_len = len(self.prompt_token_ids)
        if index < prompt_len:
            return self.prompt_token_ids[index]
        return self.output_token_ids[index - prompt_len]


def _is_plain_greedy(params: SamplingParams) -> bool:
    return (params.sampling_type == SamplingType.GREEDY and params.logprobs is None
            and not params.logit_bias and params.min_tokens == 0 and not params.has_penalties
            and params.structured_outputs is None)


@dataclass(slots=True)
class StepHandle:
    """A launched step. `output` is set once its tokens are on the host (at launch for a
    synchronous step); until then `sampled` [S] int64 holds them on the device, and `host`
    receives them behind `ready`."""

    output: ModelRunnerOutput | None = None
    sampled: torch.Tensor | None = None
    host: torch.Tensor | None = None  # pinned [>= S] int64 (CUDA); None on the CPU
    ready: torch.cuda.Event | None = None
    # row i of `sampled` is the token of the request states[i] had at launch
    states: list[RequestState] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # req_id -> row

    @property
    def is_async(self) -> bool:
        return self.output is None


class ModelRunner:
    def __init__(self, config: EngineConfig, parallel: ParallelGroup | None = None,
                 device: torch.device | None = None) -> None:
        """parallel: this process's tensor-parallel rank (default: the only one); device: the
        rank's device (default: config.device). Every rank runs the same steps; only rank 0's
        sampler draws tokens (distributed/sampling.py) and only its output leaves the group."""
        self.config = config
        self.parallel = parallel or ParallelGroup()
        self.device = device if device is not None else torch.device(config.device)
        model_config = config.model_config
        self.model_spec = model_config.model_spec  # built once, in EngineArgs.create_engine_config
        self.dtype = resolve_dtype(model_config.dtype, self.model_spec)
        torch.manual_seed(model_config.seed)
        started = time.perf_counter()
        # The engine's one HF config object and spec: the loader reads no config of its own.
        loaded = load_model(
            model_config.model_dir, self.dtype, self.device, attn_backend=config.attention_backend,
            load_format=model_config.load_format, trust_remote_code=model_config.trust_remote_code,
            hf_config=model_config.hf_config, model_spec=self.model_spec, parallel=self.parallel,
            quantization=model_config.quantization,
        )
        self.model: Any = loaded.model  # a CausalLM: forward(...) and compute_logits(...)
        self.hf_config = loaded.hf_config
        self.kernels = loaded.kernels  # chosen once, at load (kernels/registry.py)
        self.vocab_size = self.model_spec.vocab_size
        self.load_seconds = time.perf_counter() - started
        self.spec = KVCacheSpec.from_model_spec(
            self.model_spec, config.cache_config.block_size, self.dtype, self.parallel.world_size
        )
        self.sampler = make_sampler(self.parallel)
        self.states: dict[str, RequestState] = {}
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cpu_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.decode_graphs: DecodeGraphs | None = None
        self._kv_sizing = ""  # how determine_num_blocks sized the KV cache (start-up log)
        # the engine's compiled grammars (EngineGrammars.cache, set by EngineCore): a structured
        # request is only scheduled once its grammar is ready there; the runner never compiles
        self.grammar_cache: Callable[[], GrammarCompilerCache] | None = None
        self._last_launch: StepHandle | None = None  # the placeholders' source (see launch)
        self._unresolved: list[StepHandle] = []  # async steps whose ids are not on the host, in order
        # Two pinned buffers for the sampled ids of async steps, used in turn: one step in flight
        # may copy into one while the previous step's ids are read from the other.
        max_seqs = config.scheduler_config.max_num_seqs
        pin = self.device.type == "cuda"
        self._host_sampled = [torch.empty(max_seqs, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._num_async_steps = 0  # launched async with samples (statistics, tests)
        self._num_filled_steps = 0  # launched with placeholders filled on the device

    # ---------------------------------------------------------------- KV cache set-up

    def determine_num_blocks(self) -> tuple[int, int]:
        cache = self.config.cache_config
        sched = self.config.scheduler_config
        on_cpu = self.device.type == "cpu"
        available = mem_available_bytes()
        if on_cpu and available is not None:
            available //= self.parallel.world_size  # the ranks' CPU pools share this host's memory
        if cache.num_gpu_blocks_override is not None:
            num_gpu, self._kv_sizing = cache.num_gpu_blocks_override, "num_gpu_blocks_override"
        elif cache.kv_cache_memory_bytes is not None:
            num_gpu = num_blocks_from_budget(cache.kv_cache_memory_bytes, self.spec)
            self._kv_sizing = "the explicit KV cache budget"
        elif on_cpu:
            sizing = cpu_kv_cache_blocks(
                self.spec.bytes_per_block, self.spec.block_size, sched.max_num_seqs,
                sched.max_model_len, available, module_bytes(self.model),
            )  # fmt: skip
            num_gpu, self._kv_sizing = sizing.num_blocks, sizing.describe()
        else:
            budget = profile_gpu_kv_budget(
                self._profile_forward, cache.gpu_memory_utilization, self.device
            )
            num_gpu = num_blocks_from_budget(budget, self.spec)
            self._kv_sizing = f"profiled under gpu_memory_utilization {cache.gpu_memory_utilization}"
        num_cpu = num_blocks_from_budget(cache.swap_space_bytes, self.spec)
        if num_gpu < 1:
            raise ValueError("the KV cache budget holds no block; give it more memory")
        check_host_pools_fit((num_cpu + (num_gpu if on_cpu else 0)) * self.spec.bytes_per_block, available)
        return num_gpu, num_cpu  # EngineCore checks that max_model_len fits

    def initialize_kv_cache(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        # torch.zeros touches every page: the pools are resident from here on (see cpu_resources.py)
        self.kv_caches = allocate_kv_cache(self.spec, num_gpu_blocks, self.device)
        pin = self.device.type == "cuda"
        self.cpu_caches = allocate_kv_cache(
            self.spec, num_cpu_blocks, torch.device("cpu"), pin_memory=pin
        ) if num_cpu_blocks else []
        log_kv_pools(self.spec, self.device.type, num_gpu_blocks, num_cpu_blocks, self._kv_sizing,
                     self.config.scheduler_config.preemption_mode)  # fmt: skip
        if self.device.type == "cuda" and not self.config.enforce_eager:
            sched = self.config.scheduler_config
            max_blocks = -(-sched.max_model_len // self.spec.block_size)
            self.decode_graphs = DecodeGraphs(
                self.model, self.kv_caches, sched.max_num_seqs, max_blocks,
                self.spec.block_size, self.device, argmax_rows=self.kernels.argmax_rows,
            )
            self.decode_graphs.capture()

    @torch.inference_mode()
    def _profile_forward(self) -> None:
        """The largest step the scheduler can plan: max_num_batched_tokens tokens, split into
        sequences of at most max_model_len, with no KV cache (dense attention)."""
        sched = self.config.scheduler_config
        num_tokens = sched.max_num_batched_tokens
        seq_len = min(num_tokens, sched.max_model_len)
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        input_ids = torch.randint(0, self.vocab_size, (num_tokens,), device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        qsl = torch.tensor([0] + lens, device=self.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.long, device=self.device),
            query_start_loc=qsl,
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros((len(lens), 1), dtype=torch.int32, device=self.device),
            max_query_len=max(lens),
            max_seq_len=max(lens),
        )
        hidden = self.model(input_ids, positions, [], meta)
        rows = min(sched.max_num_seqs, num_tokens)
        logits = self.model.compute_logits(hidden[-rows:])
        torch.softmax(logits, dim=-1)

    # ---------------------------------------------------------------- one step

    def _update_states(self, plan: SchedulerOutput) -> None:
        for req_id in plan.finished_req_ids:
            self.states.pop(req_id, None)
        for new in plan.scheduled_new_reqs:
            params = new.sampling_params
            grammar = None
            if params.structured_outputs is not None:  # replays what was generated before a preemption
                grammar = self._grammars().matcher(params.structured_outputs, new.output_token_ids)
            self.states[new.req_id] = RequestState(
                req_id=new.req_id,
                prompt_token_ids=list(new.prompt_token_ids),
                output_token_ids=list(new.output_token_ids),
                sampling_params=params,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                eos_token_id=new.eos_token_id,
                generator=torch.Generator(device=self.device) if params.seed is not None else None,
                plain_greedy=_is_plain_greedy(params),
                grammar=grammar,
            )
        for cached in plan.scheduled_cached_reqs:
            state = self.states[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def execute_model(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: SchedulerOutput) -> StepHandle:
        self._update_states(plan)
        if plan.blocks_to_swap_out:
            move_blocks(self.kv_caches, self.cpu_caches, plan.blocks_to_swap_out)
        if plan.blocks_to_swap_in:
            move_blocks(self.cpu_caches, self.kv_caches, plan.blocks_to_swap_in)
        if plan.blocks_to_copy:
            move_blocks(self.kv_caches, self.kv_caches, plan.blocks_to_copy)
        if plan.is_empty:
            return StepHandle(output=ModelRunnerOutput(sampled_token_ids={}))

        host = self._prepare_inputs(plan)
        is_async = all(self.states[r].plain_greedy for r in host.sample_req_ids) and not any(
            self.states[r].sampling_params.prompt_logprobs is not None for r in plan.num_scheduled_tokens
        )
        previous = self._last_launch
        if not is_async or (host.placeholders and not _holds_placeholders(previous, host)):
            # This step samples on the host and appends its tokens now, so the tokens of steps
            # in flight come first (or, rarely, a placeholder's step is not the last one, whose
            # ids alone stay readable on the device). Known now, they need no device fill.
            self._resolve_all()
            for flat, req_id, position in host.placeholders:
                host.token_ids[flat] = self.states[req_id].token_at(position)
            host.placeholders.clear()
        fill = self._placeholder_fill(host, previous)
        self._num_filled_steps += fill is not None
        graphs = self.decode_graphs
        decoded: DecodeResult | None = None
        if graphs is not None and host.max_query_len == 1 and graphs.fits(len(host.seq_lens), host.max_blocks):
            decoded = graphs.run(host.token_ids, host.positions, host.slots, host.seq_lens, host.tables,
                                 fill=fill)
            hidden = decoded.hidden
        else:
            input_ids, positions, metadata = self._to_device(host)
            if fill is not None:
                fill(input_ids)
            hidden = self.model(input_ids, positions, self.kv_caches, metadata)
        if is_async:
            handle = self._launch_greedy(host, hidden, decoded)
            if handle.output is None:
                self._unresolved.append(handle)
        else:
            output = ModelRunnerOutput(sampled_token_ids={})
            self._prompt_logprobs(plan, host, hidden, output)
            if host.sample_req_ids:
                self._sample(host, hidden, decoded, output)
            handle = StepHandle(output=output)
        for req_id, num in plan.num_scheduled_tokens.items():  # after _prompt_logprobs reads them
            self.states[req_id].num_computed_tokens += num
        self._last_launch = handle
        return handle

    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        """The step's output, waiting for its sampled ids if they are still on their way (and
        for those of earlier steps, so that each state receives its tokens in order)."""
        while handle.output is None:
            self._resolve(self._unresolved[0])
        return handle.output

    def _resolve_all(self) -> None:
        while self._unresolved:
            self._resolve(self._unresolved[0])

    def _placeholder_fill(
        self, host: HostInputs, previous: StepHandle | None
    ) -> Callable[[torch.Tensor], object] | None:
        """A function that writes the placeholders' ids into a device input_ids tensor from the
        previous step's sampled ids (still on the device), or None when there is none."""
        if not host.placeholders:
            return None
        assert previous is not None and previous.sampled is not None  # _holds_placeholders
        flats = [flat for flat, _, _ in host.placeholders]
        rows = [previous.rows[req_id] for _, req_id, _ in host.placeholders]
        sampled = previous.sampled
        if flats == rows == list(range(len(rows))):  # the usual decode batch: same order
            count = len(rows)
            return lambda input_ids: input_ids[:count].copy_(sampled[:count])
        flat_idx = torch.tensor(flats, dtype=torch.long).to(self.device, non_blocking=True)
        row_idx = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        return lambda input_ids: input_ids.index_copy_(0, flat_idx, sampled.index_select(0, row_idx))

    def _launch_greedy(self, host: HostInputs, hidden: torch.Tensor,
                       decoded: DecodeResult | None) -> StepHandle:
        """Async sampling: argmax on the device; the copy to the host is only enqueued."""
        handle = StepHandle()
        if not host.sample_req_ids:
            handle.output = ModelRunnerOutput(sampled_token_ids={})
            return handle
        all_rows = len(host.sample_rows) == len(host.seq_lens) == host.query_start_loc[-1]
        if decoded is not None:
            sampled = decoded.greedy if all_rows else decoded.greedy[
                torch.tensor(host.sample_rows, device=self.device)]
        else:
            rows = torch.tensor(host.sample_rows, dtype=torch.long, device=self.device)
            sampled = self.model.compute_logits(hidden.index_select(0, rows)).argmax(dim=-1)
        handle.sampled = sampled
        for row, req_id in enumerate(host.sample_req_ids):
            state = self.states[req_id]
            state.num_pending += 1
            handle.states.append(state)
            handle.rows[req_id] = row
        self._num_async_steps += 1
        if self.device.type == "cuda":
            while len(self._unresolved) >= 2:  # both buffers hold ids not yet read
                self._resolve(self._unresolved[0])
            buffer = self._host_sampled[self._num_async_steps % 2]
            handle.host = buffer[: len(host.sample_req_ids)]
            handle.host.copy_(sampled, non_blocking=True)
            handle.ready = torch.cuda.Event()
            handle.ready.record()
        return handle

    def _resolve(self, handle: StepHandle) -> None:
        """Bring an async step's ids to the host and append them to the states that are still
        the ones it sampled for (a request finished or preempted since has another or none)."""
        if handle.output is not None:
            return
        self._unresolved.remove(handle)
        if handle.ready is not None:
            assert handle.host is not None
            handle.ready.synchronize()
            tokens = handle.host.tolist()
        else:
            assert handle.sampled is not None
            tokens = handle.sampled.tolist()
        output = ModelRunnerOutput(sampled_token_ids={})
        for state, token in zip(handle.states, tokens):
            if self.states.get(state.req_id) is state:
                state.num_pending -= 1
                state.output_token_ids.append(token)
            output.sampled_token_ids[state.req_id] = token
        handle.output = output
        handle.sampled = None  # a graph's output buffer: rewritten by its next replay

    def _prepare_inputs(self, plan: SchedulerOutput) -> HostInputs:
        bs = self.spec.block_size
        host = HostInputs()
        qsl = host.query_start_loc
        for req_id, num in plan.num_scheduled_tokens.items():
            state = self.states[req_id]
            start = state.num_computed_tokens
            end = start + num
            table = state.block_ids
            known = state.num_tokens
            if end > known:  # the position of the token the step in flight samples: see launch
                assert start == known and state.num_pending == 1, (req_id, start, known)
                host.placeholders.append((len(host.token_ids), req_id, start))
                host.token_ids.append(0)
                host.positions.append(start)
                host.slots.append(table[start // bs] * bs + start % bs)
            elif num == 1:  # decode: skip the generic range machinery
                host.token_ids.append(state.token_at(start))
                host.positions.append(start)
                host.slots.append(table[start // bs] * bs + start % bs)
            else:
                host.token_ids.extend(state.token_ids(start, end))
                host.positions.extend(range(start, end))
                host.slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(qsl[-1] + num)
            host.seq_lens.append(end)
            host.tables.append(table)
            host.max_query_len = max(host.max_query_len, num)
            host.max_blocks = max(host.max_blocks, len(table))
            if end == known + state.num_pending:  # caught up with every token: sample the next
                host.sample_req_ids.append(req_id)
                host.sample_rows.append(qsl[-1] - 1)
        return host

    def _to_device(self, host: HostInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The eager path's tensors: input_ids, positions [T] int64 and the attention metadata."""
        device = self.device

        def to_device(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        width = host.max_blocks
        padded = [t + [0] * (width - len(t)) for t in host.tables]
        metadata = AttentionMetadata(
            slot_mapping=to_device(host.slots, torch.long),
            query_start_loc=to_device(host.query_start_loc, torch.int32),
            seq_lens=to_device(host.seq_lens, torch.int32),
            block_tables=to_device(padded, torch.int32),
            max_query_len=host.max_query_len,
            max_seq_len=max(host.seq_lens),
        )
        return to_device(host.token_ids, torch.long), to_device(host.positions, torch.long), metadata

    def _sample(self, host: HostInputs, hidden: torch.Tensor, decoded: DecodeResult | None,
                output: ModelRunnerOutput) -> None:
        states = [self.states[r] for r in host.sample_req_ids]
        all_rows = len(host.sample_rows) == len(host.seq_lens) == host.query_start_loc[-1]
        if decoded is not None and all(s.plain_greedy for s in states):
            # The graph already took the argmax: one device-to-host copy and done.
            greedy = decoded.greedy
            if not all_rows:
                greedy = greedy[torch.tensor(host.sample_rows, device=greedy.device)]
            for state, token in zip(states, greedy.tolist()):
                state.output_token_ids.append(token)
                output.sampled_token_ids[state.req_id] = token
            return
        if decoded is not None:
            # a copy either way: the sampler edits logits in place, the graph owns its buffer
            logits = decoded.logits.clone() if all_rows else decoded.logits[
                torch.tensor(host.sample_rows, device=self.device)]
        else:
            rows = torch.tensor(host.sample_rows, dtype=torch.long, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
        generators = []
        for state in states:
            if state.generator is not None:
                # Counter-based seeding: draw k of a seeded request depends only on (seed, k), so
                # outputs survive preemption and do not depend on the rest of the batch.
                seed = state.sampling_params.seed
                assert seed is not None
                step_seed = (seed * _SEED_MIX + len(state.output_token_ids)) % (1 << 63)
                state.generator.manual_seed(step_seed)
            generators.append(state.generator)
        if any(state.grammar is not None for state in states):
            self._apply_grammars(states, logits)
        meta = SamplingMetadata.build(
            params=[s.sampling_params for s in states],
            prompt_token_ids=[s.prompt_token_ids for s in states],
            output_token_ids=[s.output_token_ids for s in states],
            generators=generators,
            eos_token_ids=[s.eos_token_id for s in states],
            vocab_size=self.vocab_size,
            device=self.device,
        )
        result = self.sampler(logits, meta)
        for state, token, logprobs in zip(states, result.sampled_token_ids, result.logprobs):
            if state.grammar is not None and not state.grammar.is_terminated():
                state.grammar.accept_token(token)
            state.output_token_ids.append(token)
            output.sampled_token_ids[state.req_id] = token
            if logprobs is not None:
                output.logprobs[state.req_id] = logprobs

    def _grammars(self) -> GrammarCompilerCache:
        if self.grammar_cache is None:
            raise RuntimeError("structured outputs need the engine's grammar cache (EngineCore sets it)")
        return self.grammar_cache()

    def _apply_grammars(self, states: list[RequestState], logits: torch.Tensor) -> None:
        """Mask each structured-output row of logits [N, vocab] to the tokens its grammar allows
        next. A finished grammar (its end accepted, e.g. under ignore_eos) masks nothing."""
        cache = self._grammars()
        bitmask = cache.allocate_bitmask(len(states))
        rows = []
        for row, state in enumerate(states):
            if state.grammar is not None and not state.grammar.is_terminated():
                state.grammar.fill_next_token_bitmask(bitmask, row)
                rows.append(row)
        if rows:
            cache.apply_bitmask(logits, bitmask, rows)

    def _prompt_logprobs(
        self, plan: SchedulerOutput, host: HostInputs, hidden: torch.Tensor, output: ModelRunnerOutput
    ) -> None:
        """Rows for prompt positions p in this chunk with p + 1 < prompt length: the logits at p
        score prompt token p + 1."""
        for index, (req_id, num) in enumerate(plan.num_scheduled_tokens.items()):
            state = self.states[req_id]
            num_logprobs = state.sampling_params.prompt_logprobs
            if num_logprobs is None:
                continue
            start = state.num_computed_tokens
            end = min(start + num, len(state.prompt_token_ids) - 1)
            if end <= start:
                continue
            first = host.query_start_loc[index]
            logits = self.model.compute_logits(hidden[first : first + end - start])
            targets = torch.tensor(
                state.prompt_token_ids[start + 1 : end + 1], dtype=torch.long, device=self.device
            )
            output.prompt_logprobs[req_id] = compute_prompt_logprobs(logits, targets, num_logprobs)


def _holds_placeholders(step: StepHandle | None, host: HostInputs) -> bool:
    """Whether the step's sampled ids, still on the device, include every placeholder's."""
    if step is None or step.sampled is None:
        return False
    return all(req_id in step.rows for _, req_id, _ in host.placeholders)


@dataclass(slots=True)
class HostInputs:
    """One step's inputs as host lists (layout in the module docstring)."""

    token_ids: list[int] = field(default_factory=list)  # [T]
    positions: list[int] = field(default_factory=list)  # [T]
    slots: list[int] = field(default_factory=list)  # [T]
    query_start_loc: list[int] = field(default_factory=lambda: [0])  # [B+1]
    seq_lens: list[int] = field(default_factory=list)  # [B]
    tables: list[list[int]] = field(default_factory=list)  # [B][blocks of request b]
    max_query_len: int = 0
    max_blocks: int = 0
    sample_req_ids: list[str] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # index into the packed tokens
    # (index into the packed tokens, req_id, position) of inputs the previous step samples
    placeholders: list[tuple[int, str, int]] = field(default_factory=list)
