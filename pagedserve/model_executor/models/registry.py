"""Architecture name (config.json "architectures") -> model class."""

from __future__ import annotations

from torch import nn

from pagedserve.model_executor.models.baichuan import BaichuanForCausalLM
from pagedserve.model_executor.models.chatglm import ChatGLMForCausalLM
from pagedserve.model_executor.models.glm import Glm4ForCausalLM, GlmForCausalLM
from pagedserve.model_executor.models.llama import LlamaForCausalLM
from pagedserve.model_executor.models.mistral import MistralForCausalLM
from pagedserve.model_executor.models.mixtral import MixtralForCausalLM
from pagedserve.model_executor.models.qwen import QWenLMHeadModel
from pagedserve.model_executor.models.qwen2 import Qwen2ForCausalLM
from pagedserve.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM
from pagedserve.model_executor.models.qwen3 import Qwen3ForCausalLM
from pagedserve.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

__all__ = ["SUPPORTED_ARCHITECTURES", "get_model_class"]

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,  # Llama 2/3/3.1, DeepSeek-LLM, Yi, ...
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "QWenLMHeadModel": QWenLMHeadModel,  # Qwen v1 (model_type "qwen")
    "MixtralForCausalLM": MixtralForCausalLM,  # mixture of experts (models/moe_base.py)
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    # the published ChatGLM2/3/GLM-4 configs name their remote classes; ours runs that layout
    "ChatGLMModel": ChatGLMForCausalLM,
    "ChatGLMForConditionalGeneration": ChatGLMForCausalLM,
    "GlmForCausalLM": GlmForCausalLM,
    "Glm4ForCausalLM": Glm4ForCausalLM,
    "BaichuanForCausalLM": BaichuanForCausalLM,  # Baichuan-13B, Baichuan2-7B/13B
    "BaiChuanForCausalLM": BaichuanForCausalLM,  # Baichuan-7B's spelling
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)


def get_model_class(architectures: list[str] | None) -> type[nn.Module]:
    """The class of the first supported name in `architectures`; ValueError if none is."""
    for arch in architectures or []:
        if arch in _MODELS:
            return _MODELS[arch]
    raise ValueError(
        f"architectures {list(architectures or [])} are not supported; supported: "
        f"{list(SUPPORTED_ARCHITECTURES)}")
