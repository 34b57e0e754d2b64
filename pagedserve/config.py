"""EngineArgs (vLLM's argument names) -> EngineConfig, validated once at start-up.

Torch-free at import time: core/ imports the scheduler and cache configs from here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

from pagedserve.batch_defaults import (
    USAGE_CONTEXTS,
    BatchLimits,
    DeviceInfo,
    probe_device,
    resolve_batch_limits,
)
from pagedserve.model_executor.model_spec import ModelSpec  # torch-free (pure dataclasses)

logger = logging.getLogger(__name__)

_PREEMPTION_MODES = ("recompute", "swap")
_POLICIES = ("fcfs", "priority")
_DTYPES = ("auto", "float32", "float", "float16", "half", "bfloat16")
# what model_executor/loader.py reads; "dummy": no weights, random values (benchmarks, as vLLM)
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")
GiB = 1 << 30


@dataclass(slots=True)
class CacheConfig:
    block_size: int
    gpu_memory_utilization: float
    swap_space_bytes: int  # 0 unless preemption_mode is "swap": recompute never uses the pool
    enable_prefix_caching: bool
    kv_cache_memory_bytes: int | None  # explicit KV budget; None: profiled (GPU) or sized (CPU)
    num_gpu_blocks_override: int | None
    # Filled in by the worker once memory is known.
    num_gpu_blocks: int = 0
    num_cpu_blocks: int = 0


@dataclass(slots=True)
class SloConfig:
    """Service-level objectives per priority class ("interactive", "batch"), in seconds; a class
    missing from a map has no such objective. Set with --slo-ttft-ms / --slo-tpot-ms."""

    ttft_s: dict[str, float]
    tpot_s: dict[str, float]

    @property
    def tightest_tpot_s(self) -> float | None:
        return min(self.tpot_s.values()) if self.tpot_s else None


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool
    preemption_mode: str  # "recompute" | "swap"
    policy: str  # "fcfs" | "priority"
    slo: SloConfig | None = None  # objectives: the SLO controller sets the caps (core/slo_controller.py)
    # how max_num_seqs / max_num_batched_tokens were chosen ("given", or the defaults' device row)
    limits_source: str = "given"


@dataclass(slots=True)
class ModelConfig:
    model: str  # as given by the user (path or hub id)
    model_dir: str  # resolved local directory, or the .gguf file of a GGUF checkpoint
    tokenizer: str
    dtype: str  # resolved later to a torch dtype by the loader; the user's string here
    max_model_len: int
    seed: int
    hf_config: Any  # the engine's one transformers config object (read with trust_remote_code)
    model_spec: ModelSpec  # built once from hf_config; what the worker, KV cache and limits read
    served_model_name: str
    max_logprobs: int
    trust_remote_code: bool = False  # passed to transformers (config, tokenizer, loader)
    load_format: str = "auto"  # "auto" | "safetensors" | "pt" | "dummy" (see loader.iterate_weights)
    quantization: str | None = None  # the user's method name; None: the checkpoint's (if any)
    # SamplingParams defaults from generation_config.json (see generation_defaults.py): used for
    # the knobs a request leaves unset, by the OpenAI server and LLM.generate without params
    generation_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(slots=True)
class ParallelConfig:
    """How the model is split over processes (vLLM's names). tensor_parallel_size N > 1: N worker
    processes, one per rank (pagedserve/executor/multiproc.py), each holding 1/N of the attention
    heads, of the MLP and of the vocabulary, and its share of the KV heads."""

    tensor_parallel_size: int = 1
    # "uni": the runner in the engine process (tensor_parallel_size 1 only); "mp": one worker
    # process per rank. None: "uni" for 1, "mp" otherwise.
    distributed_executor_backend: str | None = None

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size

    @property
    def executor_backend(self) -> str:
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.tensor_parallel_size == 1 else "mp"

    def verify(self, spec: ModelSpec, device: str) -> None:
        """vLLM's rules: the query heads split evenly over the ranks; the KV heads too, or (fewer
        KV heads than ranks) each KV head is replicated on tp / kv_heads ranks."""
        tp = self.tensor_parallel_size
        if spec.num_heads % tp:
            raise ValueError(f"the model's {spec.num_heads} attention heads must be divisible by "
                             f"tensor_parallel_size ({tp})")
        kv = spec.num_kv_heads
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            raise ValueError(f"tensor_parallel_size ({tp}) and the model's {kv} KV heads must divide "
                             "one another (KV heads are split over the ranks, or replicated)")
        if self.executor_backend == "uni" and tp != 1:
            raise ValueError("distributed_executor_backend 'uni' runs one rank: tensor_parallel_size must be 1")
        if device == "cuda" and tp > 1:
            import torch

            count = torch.cuda.device_count()
            if tp > count:
                raise ValueError(f"tensor_parallel_size {tp} needs {tp} GPUs (one per rank), {count} visible")


@dataclass(slots=True)
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    device: str  # "cpu" or "cuda"
    enforce_eager: bool
    attention_backend: str  # "torch" or "triton"
    # steps with prefill of up to this many tokens replay CUDA graphs too (worker/mixed_graphs.py);
    # 0 or 1: only decode steps do
    mixed_graph_max_tokens: int = 1024
    async_scheduling: bool = False  # plan step n+1 while step n runs (see engine_core.py)
    cpu_threads: int | None = None  # engine intra-op threads; None: chosen (worker/cpu_resources.py)
    parallel_config: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)


@dataclass
class EngineArgs:
    """The engine's arguments, with vLLM's names and defaults where they exist."""

    model: str = ""
    tokenizer: str | None = None
    revision: str | None = None
    tokenizer_revision: str | None = None  # used when `tokenizer` is a hub id
    trust_remote_code: bool = False
    download_dir: str | None = None  # hub snapshots go here instead of the HF cache
    load_format: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4  # GiB of CPU memory for swapped-out blocks
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    # None: chosen from the device and usage_context (batch_defaults.py; 256 / 2048 on the CPU)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    usage_context: str = "llm"  # "llm" (offline LLM class) | "server" (the OpenAI server), as vLLM's
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    preemption_mode: str = "recompute"
    scheduling_policy: str = "fcfs"
    async_scheduling: bool = True  # on by default (issue 13); steps that need the host sample in step
    enforce_eager: bool = False
    # the largest step with prefill replayed from a CUDA graph (padded to a captured size); 0: such
    # steps run eagerly (decode steps still replay theirs unless enforce_eager)
    mixed_graph_max_tokens: int = 1024
    quantization: str | None = None
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # "uni" | "mp" | None (chosen by the size)
    device: str = "auto"
    served_model_name: str | None = None
    max_logprobs: int = 20
    disable_log_stats: bool = True  # accepted for vLLM compatibility; stats are always kept
    generation_config: str = "auto"  # "auto" (the model's file), "vllm" (ignore it) or a directory
    override_generation_config: dict[str, Any] | None = None
    cpu_threads: int | None = None  # torch intra-op threads of the engine (default: chosen on CPU)
    model_public_key: str | None = None  # Ed25519 key the model's SHA256SUMS.sig must verify with
    # SLOs in ms: a number (every priority class) or {"interactive": 30, "batch": 200} (or the
    # same as text, "interactive=30,batch=200"); see parse_slo_ms
    slo_ttft_ms: float | str | dict[str, float] | None = None
    slo_tpot_ms: float | str | dict[str, float] | None = None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def _validate(self) -> None:
        if not self.model:
            raise ValueError("model must be given (a local directory, a .gguf file or a Hugging Face hub id)")
        checks: list[tuple[bool, str]] = [
            (self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size must be a power of two in [1, 128]"),
            (0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization must be in (0, 1]"),
            (self.swap_space >= 0, "swap_space must be >= 0 (GiB)"),
            (self.max_num_seqs is None or self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.usage_context in USAGE_CONTEXTS,
             f"usage_context must be one of {USAGE_CONTEXTS}, got {self.usage_context!r}"),
            (self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
             "max_num_batched_tokens must be >= 1"),
            (self.max_model_len is None or self.max_model_len >= 1, "max_model_len must be >= 1"),
            (self.preemption_mode in _PREEMPTION_MODES,
             f"preemption_mode must be one of {_PREEMPTION_MODES}, got {self.preemption_mode!r}"),
            (self.scheduling_policy in _POLICIES,
             f"scheduling_policy must be one of {_POLICIES}, got {self.scheduling_policy!r}"),
            (self.dtype in _DTYPES, f"dtype must be one of {_DTYPES}, got {self.dtype!r}"),
            (self.load_format in LOAD_FORMATS,
             f"load_format {self.load_format!r} is not supported yet (supported: {', '.join(LOAD_FORMATS)})"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size must be >= 1"),
            (self.distributed_executor_backend in (None, "uni", "mp"),
             "distributed_executor_backend must be 'uni' or 'mp'"),
            (self.device in ("auto", "cpu", "cuda"), "device must be 'auto', 'cpu' or 'cuda'"),
            (self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
             "num_gpu_blocks_override must be >= 1"),
            (self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
             "kv_cache_memory_bytes must be > 0"),
            (self.cpu_threads is None or self.cpu_threads >= 1, "cpu_threads must be >= 1"),
            (self.mixed_graph_max_tokens >= 0, "mixed_graph_max_tokens must be >= 0 (0: steps with prefill run eagerly)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        parse_slo_ms(self.slo_ttft_ms, "slo_ttft_ms")
        parse_slo_ms(self.slo_tpot_ms, "slo_tpot_ms")

    def slo_config(self) -> SloConfig | None:
        ttft = parse_slo_ms(self.slo_ttft_ms, "slo_ttft_ms")
        tpot = parse_slo_ms(self.slo_tpot_ms, "slo_tpot_ms")
        if not ttft and not tpot:
            return None
        return SloConfig(ttft_s={k: v / 1e3 for k, v in ttft.items()}, tpot_s={k: v / 1e3 for k, v in tpot.items()})

    def batch_limits(self, device: str, max_model_len: int) -> BatchLimits:
        """max_num_seqs / max_num_batched_tokens: as given, else from the device (probed only then)."""
        given = self.max_num_seqs is not None and self.max_num_batched_tokens is not None
        info = DeviceInfo("cpu") if given or device != "cuda" else probe_device(device)
        limits = resolve_batch_limits(info, self.usage_context, self.max_num_seqs, self.max_num_batched_tokens,
                                      self.enable_chunked_prefill, max_model_len)
        logger.info("max_num_seqs=%d max_num_batched_tokens=%d (%s)", limits.max_num_seqs,
                    limits.max_num_batched_tokens, limits.source)
        return limits

    def create_engine_config(self) -> EngineConfig:
        self._validate()
        from pagedserve.generation_defaults import load_generation_defaults
        from pagedserve.model_executor.gguf_loader import find_gguf_file, load_gguf_config
        from pagedserve.model_executor.loader import resolve_model_dir  # lazy: torch-free import
        from pagedserve.model_executor.model_spec import load_hf_config
        from pagedserve.model_repo import prepare_model  # URL -> verified local cache (model_repo/)

        model_path = prepare_model(self.model, self.model_public_key, self.download_dir)
        model_dir = resolve_model_dir(model_path, self.revision, self.download_dir, self.load_format)
        # A GGUF checkpoint (a .gguf file, or a directory holding one): model_dir is the file, its
        # config and tokenizer come from its metadata, generation_config.json from beside it.
        gguf_file = find_gguf_file(model_dir)
        model_dir = gguf_file or model_dir
        tokenizer = model_dir
        if self.tokenizer:
            tokenizer = find_gguf_file(self.tokenizer) or resolve_model_dir(
                self.tokenizer, self.tokenizer_revision, self.download_dir, tokenizer_only=True)
        # The only read of the checkpoint's config: the worker builds the model from these two.
        hf_config = (load_gguf_config(gguf_file) if gguf_file else
                     load_hf_config(model_dir, trust_remote_code=self.trust_remote_code))
        model_spec = ModelSpec.from_hf(hf_config)
        # quantization= must agree with the checkpoint (and name a known method): fail at start-up
        from pagedserve.model_executor.quantization.base import resolve_quant_config

        resolve_quant_config(model_dir, model_spec, self.quantization)
        generation_defaults = load_generation_defaults(
            os.path.dirname(gguf_file) if gguf_file else model_dir, self.generation_config,
            self.override_generation_config)
        max_model_len = _derive_max_model_len(model_spec.max_context_len, self.max_model_len)
        device = self.device
        if device == "auto":
            device = "cuda" if _cuda_available() else "cpu"
        limits = self.batch_limits(device, max_model_len)
        max_batched = limits.max_num_batched_tokens
        if not self.enable_chunked_prefill and max_batched < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_batched}) is smaller than max_model_len "
                f"({max_model_len}); without chunked prefill a prompt could never be scheduled"
            )
        parallel = ParallelConfig(self.tensor_parallel_size, self.distributed_executor_backend)
        parallel.verify(model_spec, device)
        kv_budget = self.kv_cache_memory_bytes
        if kv_budget is None and device == "cpu":
            kv_budget = _cpu_kv_space_from_env()  # None (the default): sized by the worker
        # Only swap preemption uses the swap pool; with recompute it would be memory held for nothing.
        swap_bytes = int(self.swap_space * GiB) if self.preemption_mode == "swap" else 0
        return EngineConfig(
            model_config=ModelConfig(
                model=self.model,
                model_dir=model_dir,
                tokenizer=tokenizer,
                dtype=self.dtype,
                max_model_len=max_model_len,
                seed=self.seed,
                hf_config=hf_config,
                model_spec=model_spec,
                served_model_name=self.served_model_name or self.model,
                max_logprobs=self.max_logprobs,
                trust_remote_code=self.trust_remote_code,
                load_format=self.load_format,
                quantization=self.quantization,
                generation_defaults=generation_defaults,
            ),
            cache_config=CacheConfig(
                block_size=self.block_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                swap_space_bytes=swap_bytes,
                enable_prefix_caching=self.enable_prefix_caching,
                kv_cache_memory_bytes=kv_budget,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
            ),
            scheduler_config=SchedulerConfig(
                max_num_seqs=limits.max_num_seqs,
                max_num_batched_tokens=max_batched,
                max_model_len=max_model_len,
                enable_chunked_prefill=self.enable_chunked_prefill,
                preemption_mode=self.preemption_mode,
                policy=self.scheduling_policy,
                slo=self.slo_config(),
                limits_source=limits.source,
            ),
            device=device,
            enforce_eager=self.enforce_eager,
            mixed_graph_max_tokens=self.mixed_graph_max_tokens,
            attention_backend="triton" if device == "cuda" else "torch",
            async_scheduling=self.async_scheduling,
            cpu_threads=self.cpu_threads,
            parallel_config=parallel,
        )


PRIORITY_CLASSES = ("interactive", "batch")


def check_priority_class(priority_class: str) -> None:
    if priority_class not in PRIORITY_CLASSES:
        raise ValueError(f"priority_class must be one of {', '.join(PRIORITY_CLASSES)}, got {priority_class!r}")


def parse_slo_ms(value: float | str | dict[str, float] | None, name: str) -> dict[str, float]:
    """An objective in ms -> {class: ms}. A plain number applies to every priority class;
    "interactive=30,batch=200" (or a dict) sets classes one by one."""
    if value is None:
        return {}
    per_class: dict[str, float]
    if isinstance(value, str):
        text = value.strip()
        if "=" in text:
            per_class = {}
            for part in text.split(","):
                key, _, text_ms = part.partition("=")
                try:
                    per_class[key.strip()] = float(text_ms)
                except ValueError:
                    raise ValueError(f"{name}: {part!r} is not CLASS=MS") from None
        else:
            try:
                per_class = dict.fromkeys(PRIORITY_CLASSES, float(text))
            except ValueError:
                raise ValueError(f"{name} must be a number of ms or 'interactive=MS,batch=MS', got {value!r}") from None
    elif isinstance(value, bool):
        raise ValueError(f"{name} must be a number of ms, got {value!r}")
    elif isinstance(value, (int, float)):
        per_class = dict.fromkeys(PRIORITY_CLASSES, float(value))
    else:
        per_class = dict(value)
    out: dict[str, float] = {}
    for key, ms in per_class.items():
        if key not in PRIORITY_CLASSES:
            raise ValueError(f"{name}: unknown priority class {key!r} (classes: {', '.join(PRIORITY_CLASSES)})")
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not (0 < float(ms) < float("inf")):
            raise ValueError(f"{name}: the objective of {key!r} must be a positive number of ms, got {ms!r}")
        out[key] = float(ms)
    return out


def _derive_max_model_len(limit: int | None, requested: int | None) -> int:
    """max_model_len from the model's context length (ModelSpec.max_context_len, None if the config
    gives none) and the user's request."""
    if requested is None:
        if limit is None:
            raise ValueError("the model config gives no context length; pass max_model_len")
        return limit
    if limit is not None and requested > limit:
        raise ValueError(
            f"max_model_len ({requested}) is larger than the model's context length ({limit})"
        )
    return requested


def _cpu_kv_space_from_env() -> int | None:
    """PAGEDSERVE_CPU_KVCACHE_SPACE or vLLM's VLLM_CPU_KVCACHE_SPACE, in GiB; unset or 0: automatic."""
    for name in ("PAGEDSERVE_CPU_KVCACHE_SPACE", "VLLM_CPU_KVCACHE_SPACE"):
        text = os.environ.get(name, "").strip()
        if text:
            try:
                gib = float(text)
            except ValueError:
                raise ValueError(f"{name} must be a number of GiB, got {text!r}") from None
            if gib < 0:
                raise ValueError(f"{name} must be >= 0 (GiB), got {text!r}")
            return int(gib * GiB) or None
    return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
