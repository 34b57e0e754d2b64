"""Model loading: locate the checkpoint, pick the dtype, build the module, stream the weights.

    resolve_model_dir("org/name")        local dir, or a hub snapshot (offline: local cache only)
    resolve_dtype("auto", model_spec)    checkpoint dtype (float32 stays float32 on CPU)
    load_model(dir, dtype, device)       module built on `device` in `dtype`, no random init;
                                         safetensors tensors copied in one at a time (each
                                         rank its slice), then every LinearMethod's
                                         process_weights_after_loading

The module is constructed under `torch.device(device)` with the default dtype set to `dtype`;
our layers allocate parameters with `torch.empty` (no initialisation), so the only full copy of
the weights that ever exists is the model's own.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pagedserve.kernels.registry import KernelSet, get_kernel_set
from pagedserve.model_executor.layers.context import BuildContext, ParallelGroup
from pagedserve.model_executor.model_spec import ModelSpec, checkpoint_dtype, load_hf_config
from pagedserve.model_executor.models.registry import get_model_class
from pagedserve.model_executor.quantization.base import LinearMethod, QuantConfig, resolve_quant_config

__all__ = [
    "LoadedModel",
    "resolve_model_dir",
    "resolve_dtype",
    "load_model",
    "safetensors_files",
    "iterate_safetensors",
    "iterate_weights",
    "process_weights_after_loading",
    "pt_files",
]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
_TOKENIZER_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_WEIGHT_PATTERNS = {"safetensors": ["*.safetensors"], "pt": ["*.bin", "*.pt"], "auto": ["*.safetensors"]}


@dataclass(slots=True)
class LoadedModel:
    model: nn.Module
    hf_config: Any  # transformers.PretrainedConfig: the engine's one config object
    model_spec: ModelSpec  # what the model was built from (model_spec.py)
    model_dir: str
    dtype: torch.dtype
    kernels: KernelSet  # the one kernel set the model was built with
    quant_config: QuantConfig | None = None  # the checkpoint's quantization (None: unquantized)


def resolve_model_dir(model: str, revision: str | None = None, download_dir: str | None = None,
                      load_format: str = "auto", tokenizer_only: bool = False) -> str:
    """A local directory as is, else a hub id through huggingface_hub.snapshot_download (the
    weights `load_format` reads, none when `tokenizer_only`).

    Honours HF_HUB_OFFLINE (read at call time): offline, only the local HF cache (or
    `download_dir`) is consulted. Raises ValueError naming `model` when nothing is found.
    """
    if not model:
        raise ValueError("model must be a local directory or a Hugging Face hub id, got ''")
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        from pagedserve.model_executor.gguf_loader import is_gguf

        if is_gguf(path):  # a single-file GGUF checkpoint (gguf_loader.py)
            return str(path.resolve())
        raise ValueError(f"model {model!r} is a file; expected a checkpoint directory or a .gguf file")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        # "dummy" has no _WEIGHT_PATTERNS entry: config and tokenizer only
        patterns = _TOKENIZER_PATTERNS + ([] if tokenizer_only else _WEIGHT_PATTERNS.get(load_format, []))
        return snapshot_download(repo_id=model, revision=revision, cache_dir=download_dir,
                                 allow_patterns=patterns, local_files_only=offline)
    except Exception as exc:  # hub errors are many (not found, gated, offline, invalid id)
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the hub"
        raise ValueError(
            f"model {model!r} is not a local directory and could not be fetched from {where}: "
            f"{type(exc).__name__}: {exc}") from exc


def resolve_dtype(dtype: str | torch.dtype, hf_config: Any,
                  device: str | torch.device | None = None) -> torch.dtype:
    """Mirror vLLM: "auto" takes the checkpoint's dtype (a ModelSpec's `dtype`, or a config's, read
    by model_spec.checkpoint_dtype; float32 if absent); a float32 checkpoint stays float32 on CPU
    and runs in bfloat16 (float16 where bf16 is unsupported) on a GPU. `device` defaults to CUDA
    when available."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
        return dtype
    key = dtype.strip().lower()
    if key != "auto":
        if key not in _DTYPES:
            raise ValueError(f"dtype must be one of {['auto', *_DTYPES]}, got {dtype!r}")
        return _DTYPES[key]
    source = hf_config  # a ModelSpec (the engine) or a transformers config / namespace (tools, tests)
    name = source.dtype if isinstance(source, ModelSpec) else checkpoint_dtype(source)
    cfg_dtype = _DTYPES.get(name or "", torch.float32)
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if cfg_dtype == torch.float32 and dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return cfg_dtype


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors files: the shards named by model.safetensors.index.json, else
    model.safetensors, else every *.safetensors file. FileNotFoundError when there are none."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [root / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return [str(f) for f in files]
    single = root / "model.safetensors"
    if single.is_file():
        return [str(single)]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        hint = " (it has .bin weights: --load-format pt or auto reads them)" if any(
            root.glob("*.bin")) else ""
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}{hint}")
    return [str(f) for f in files]


def iterate_safetensors(files: list[str], show_progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) one at a time across all files (memory-mapped reads)."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    total = 0
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as handle:
            total += len(list(handle.keys()))
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not show_progress) as bar:
        for f in files:
            bar.set_postfix_str(Path(f).name)
            with safe_open(f, framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, handle.get_tensor(name)
                    bar.update(1)


_NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"}


def pt_files(model_dir: str) -> list[str]:
    """PyTorch weights: the shards named by pytorch_model.bin.index.json, else every *.bin (else
    *.pt) file that is not trainer state. FileNotFoundError when there are none."""
    root = Path(model_dir)
    index = root / "pytorch_model.bin.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [str(root / name) for name in sorted(set(weight_map.values()))]
    for pattern in ("*.bin", "*.pt"):
        files = [str(f) for f in sorted(root.glob(pattern)) if f.name not in _NOT_WEIGHTS]
        if files:
            return files
    raise FileNotFoundError(f"no PyTorch (*.bin / *.pt) weights in {model_dir}")


def iterate_pt(files: list[str], show_progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) from PyTorch state-dict files. weights_only=True: the unpickler
    accepts tensors and plain containers only, so a checkpoint cannot run code."""
    from tqdm.auto import tqdm

    for f in tqdm(files, desc="Loading weights", unit="file", disable=not show_progress):
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{f} does not hold a state dict")
        yield from state.items()
        del state


def iterate_weights(model_dir: str, load_format: str = "auto",
                    show_progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors in `load_format`: "safetensors", "pt", or "auto" (safetensors
    when there are any, else PyTorch files, as vLLM)."""
    if load_format == "auto":
        has_safetensors = any(Path(model_dir).glob("*.safetensors"))
        load_format = "safetensors" if has_safetensors or not any(Path(model_dir).glob("*.bin")) else "pt"
    if load_format == "safetensors":
        return iterate_safetensors(safetensors_files(model_dir), show_progress)
    if load_format == "pt":
        return iterate_pt(pt_files(model_dir), show_progress)
    raise ValueError(f"load_format {load_format!r} is not supported yet (supported: auto, safetensors, pt)")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(model_dir: str, dtype: torch.dtype, device: torch.device | str,
               attn_backend: str = "torch", show_progress: bool = True, load_format: str = "auto",
               trust_remote_code: bool = False, hf_config: Any = None,
               model_spec: ModelSpec | None = None,
               parallel: ParallelGroup | None = None, quantization: str | None = None,
               kernels: KernelSet | None = None) -> LoadedModel:
    """Build the model for model_dir's config on `device` in `dtype` and load its weights.

    The engine passes the config (and spec) it read at start-up, so the checkpoint's config is
    read once; without them (tests, tools) it is read here with `trust_remote_code`. `parallel` is
    this process's tensor-parallel rank (default: the only rank); each rank loads its shard.
    `quantization` must agree with the checkpoint's quantization config (None: take it).
    `kernels` replaces the set `attn_backend` names (tests inject twins)."""
    from pagedserve.model_executor.gguf_loader import find_gguf_file, iterate_gguf, load_gguf_config

    gguf_file = find_gguf_file(model_dir)
    if hf_config is None and gguf_file is not None:
        hf_config = load_gguf_config(gguf_file)
    if hf_config is None:
        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {model_dir!r}; not a Hugging Face checkpoint")
        hf_config = load_hf_config(model_dir, trust_remote_code=trust_remote_code)
    spec = model_spec if model_spec is not None else ModelSpec.from_hf(hf_config)
    model_cls = get_model_class(list(spec.architectures))
    quant_config = resolve_quant_config(model_dir, spec, quantization)
    if quant_config is not None:  # merged module -> its checkpoint parts, for get_method
        quant_config.packed_modules_mapping = dict(getattr(model_cls, "packed_modules_mapping", {}))
    dummy = load_format == "dummy"
    device = torch.device(device)
    keep: Container[str] = ()
    if gguf_file is not None:
        from pagedserve.model_executor.quantization.gguf_quant import GGUFConfig, auto_gguf_config

        if quant_config is None:  # kept quantized anyway when dequantized weights would not fit
            quant_config = auto_gguf_config(gguf_file, dtype, device)
            if quant_config is not None:
                quant_config.packed_modules_mapping = dict(getattr(model_cls, "packed_modules_mapping", {}))
        if isinstance(quant_config, GGUFConfig):
            keep = quant_config.kept  # filled while the model is built, read once loading starts
    weights = (iter(()) if dummy
               else iterate_gguf(gguf_file, dtype, show_progress, keep) if gguf_file is not None
               else iterate_weights(model_dir, load_format, show_progress))  # fails here on missing files
    with torch.device(device), _default_dtype(dtype):
        # The one kernel choice: pointwise ops, GEMV and argmax follow the attention backend.
        if kernels is None:
            kernels = get_kernel_set(attn_backend)
        ctx = BuildContext.create(kernels, parallel=parallel or ParallelGroup(),
                                  quant_config=quant_config)
        model = model_cls(hf_config, ctx=ctx, spec=spec)  # type: ignore[call-arg]
    loaded = fill_dummy_weights(model) if dummy else model.load_weights(weights)  # type: ignore[operator]
    missing = sorted(set(dict(model.named_parameters())) - set(loaded))
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint {model_dir!r} lacks weights for: {shown}")
    with torch.device(device), _default_dtype(dtype):
        process_weights_after_loading(model)
    model.eval()
    return LoadedModel(model=model, hf_config=hf_config, model_spec=spec, model_dir=model_dir, dtype=dtype,
                       kernels=kernels, quant_config=quant_config)


def fill_dummy_weights(model: nn.Module, seed: int = 0) -> set[str]:
    """load_format="dummy": every parameter gets seeded random values in place, drawn on its own
    device (a 90 GB model fills in seconds), and the names are returned as "loaded". Values are
    shaped like a trained model's scale, so benchmarks see realistic numerics and MoE routing:
    norm weights 1, biases 0, other floating weights normal(0, 0.02) (Hugging Face's initializer
    range), integer (packed quantized) tensors uniform over their bits. Never zeros: METHOD.md's
    rule against timing on zeros."""
    names = set()
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        gen = generators.get(param.device)
        if gen is None:
            gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        data = param.data
        leaf = name.rpartition(".")[2]
        if data.is_floating_point():
            if leaf == "bias":
                data.zero_()
            elif data.dim() == 1 and "norm" in name:
                data.fill_(1.0)
            else:
                data.normal_(0.0, 0.02, generator=gen)
        elif data.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            info = torch.iinfo(data.dtype)
            data.random_(info.min, info.max, generator=gen)
        else:
            raise ValueError(f"load_format='dummy' cannot fill {name} of dtype {data.dtype}")
        names.add(name)
    return names


def process_weights_after_loading(model: nn.Module) -> None:
    """Every linear layer's method repacks / converts its weights, once all are loaded."""
    for module in model.modules():
        method = getattr(module, "linear_method", None)
        if isinstance(method, LinearMethod):
            method.process_weights_after_loading(module)
