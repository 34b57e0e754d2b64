"""SchedulerOutput -> input tensors -> model -> sampler -> ModelRunnerOutput: the coordinator.

Each job lives in a module of its own; the runner only sequences them:

    input_batch.py    per-request state from the plan's diffs; the step's host inputs [T] / [B]
    kv_cache.py       KV pool sizing (profiling on the GPU), allocation, swap and copy of blocks
    cuda_graphs.py    decode steps replayed as CUDA graphs (GPU only)
    mixed_graphs.py   steps with prefill (up to mixed_graph_max_tokens) replayed likewise
    async_output.py   steps whose greedy ids stay on the device until collected (async scheduling)
    step_sampling.py  every other step's sampling: seeds, the plan's grammar masks, the sampler,
                      prompt logprobs

A step is launch(plan) -> StepHandle, then collect(handle) -> ModelRunnerOutput; execute_model does
both at once. The worker holds no tokenizer and no grammar: structured outputs arrive as bitmasks
in the plan (SchedulerOutput.grammar, filled by the engine core), and it only applies them.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pagedserve.config import EngineConfig
from pagedserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagedserve.distributed.sampling import make_sampler
from pagedserve.model_executor.layers.context import ParallelGroup
from pagedserve.model_executor.loader import load_model, resolve_dtype
from pagedserve.worker.async_output import AsyncOutputs, StepHandle
from pagedserve.worker.cuda_graphs import DecodeGraphs, DecodeResult
from pagedserve.worker.input_batch import RequestState, prepare_inputs, to_device, update_states
from pagedserve.worker.kv_cache import (
    KVCacheSpec,
    allocate_kv_cache,
    determine_num_blocks,
    log_kv_pools,
    move_blocks,
    used_device_memory,
)
from pagedserve.worker.mixed_graphs import MixedGraphs, mixed_capture_sizes
from pagedserve.worker.step_sampling import StepSampler

__all__ = ["ModelRunner", "RequestState", "StepHandle"]


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
        # what the device holds before this engine loads anything (other processes, the CUDA
        # context) is not this engine's: gpu_memory_utilization is its own share (kv_cache.py)
        self._baseline_used = used_device_memory(self.device) if self.device.type == "cuda" else 0
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
        # One dict of request states, shared (not copied) by the parts that read or extend it.
        self.states: dict[str, RequestState] = {}
        self.async_outputs = AsyncOutputs(self.states, self.device, config.scheduler_config.max_num_seqs)
        self.sampling = StepSampler(self.model, self.states, self.vocab_size, self.device,
                                    config.scheduler_config.max_num_seqs)
        self.sampling.sampler = make_sampler(self.parallel)  # tp: rank 0 draws, the others take its ids
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cpu_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self._kv_sizing = ""  # how determine_num_blocks sized the KV cache (start-up log)

    # statistics of async scheduling (tests)
    @property
    def _num_async_steps(self) -> int:
        return self.async_outputs.num_async_steps

    @property
    def _num_filled_steps(self) -> int:
        return self.async_outputs.num_filled_steps

    # ---------------------------------------------------------------- KV cache set-up

    def determine_num_blocks(self) -> tuple[int, int]:
        """(device blocks, CPU swap blocks); see kv_cache.py for the sizing rules."""
        max_logprobs = self.config.model_config.max_logprobs
        num_gpu, num_cpu, self._kv_sizing = determine_num_blocks(
            self.config, self.spec, self.model, self.device, self.vocab_size,
            sample=lambda logits: self.sampling.profile(logits, max_logprobs), baseline_used=self._baseline_used,
        )  # fmt: skip
        return num_gpu, num_cpu

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
            pool = torch.cuda.graph_pool_handle()  # one pool for both kinds (mixed_graphs.py)
            self.decode_graphs.capture(pool)
            if mixed_capture_sizes(sched.max_num_batched_tokens, self.config.mixed_graph_max_tokens):
                self.mixed_graphs = MixedGraphs(
                    self.model, self.kv_caches, sched.max_num_seqs, sched.max_num_batched_tokens, max_blocks,
                    self.spec.block_size, self.device, max_tokens=self.config.mixed_graph_max_tokens,
                )
                self.mixed_graphs.capture(pool)

    @property
    def cuda_graph_capture_seconds(self) -> float | None:
        """Seconds spent capturing every CUDA graph; None: no graphs (CPU, enforce_eager)."""
        if self.decode_graphs is None:
            return None
        mixed = self.mixed_graphs.capture_seconds if self.mixed_graphs is not None else 0.0
        return self.decode_graphs.capture_seconds + mixed

    # ---------------------------------------------------------------- one step

    def execute_model(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: SchedulerOutput) -> StepHandle:
        """Run the plan's forward pass and sample, or (async: every sampled request
        async_sampleable, no prompt logprobs) only enqueue the draw; collect() returns the output
        either way."""
        states = self.states
        update_states(states, plan, self.device)
        if plan.blocks_to_swap_out:
            move_blocks(self.kv_caches, self.cpu_caches, plan.blocks_to_swap_out)
        if plan.blocks_to_swap_in:
            move_blocks(self.cpu_caches, self.kv_caches, plan.blocks_to_swap_in)
        if plan.blocks_to_copy:
            move_blocks(self.kv_caches, self.kv_caches, plan.blocks_to_copy)
        if plan.is_empty:
            return StepHandle(output=ModelRunnerOutput(sampled_token_ids={}))

        host = prepare_inputs(states, plan, self.spec.block_size)
        all_plain = all(states[r].plain_greedy for r in host.sample_req_ids)
        # (plain greedy rows are async-sampleable too)
        is_async = plan.grammar is None and all(states[r].async_sampleable for r in host.sample_req_ids) and not any(
            states[r].sampling_params.prompt_logprobs is not None for r in plan.num_scheduled_tokens
        )
        fill = self.async_outputs.placeholder_fill(host, is_async)  # resolves steps in flight if sync
        graphs, mixed = self.decode_graphs, self.mixed_graphs
        decoded: DecodeResult | None = None
        if graphs is not None and host.max_query_len == 1 and graphs.fits(len(host.seq_lens), host.max_blocks):
            decoded = graphs.run(host.token_ids, host.positions, host.slots, host.seq_lens, host.tables,
                                 fill=fill)
            hidden = decoded.hidden
        elif mixed is not None and host.max_query_len > 1 and mixed.fits(
                len(host.token_ids), len(host.seq_lens), host.max_blocks):
            hidden = mixed.run(host, fill=fill)
        else:
            input_ids, positions, metadata = to_device(host, self.device)
            if fill is not None:
                fill(input_ids)
            hidden = self.model(input_ids, positions, self.kv_caches, metadata)
        drawn = None
        if is_async and not all_plain:
            drawn = self.sampling.sample_on_device(host, hidden, decoded)  # [S] on the device
            if drawn is None:  # the penalty tables are full: sample from the lists, in order
                self.async_outputs.resolve_all()
                is_async = False
        if is_async:
            handle = self.async_outputs.launch_async(host, hidden, decoded, self.model.compute_logits, drawn)
        else:
            output = ModelRunnerOutput(sampled_token_ids={})
            self.sampling.prompt_logprobs(plan, host, hidden, output)
            if host.sample_req_ids:
                self.sampling.sample(host, hidden, decoded, plan.grammar, output)
            handle = StepHandle(output=output)
        # num_computed_tokens is not advanced here: the next plan carries it (input_batch.py)
        self.async_outputs.last_launch = handle
        return handle

    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        """The step's output, waiting for its sampled ids if they are still on their way."""
        return self.async_outputs.collect(handle)
