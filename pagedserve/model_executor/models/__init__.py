"""Model implementations, one file per architecture family; `registry` maps HF names to them."""

from pagedserve.model_executor.models.registry import SUPPORTED_ARCHITECTURES, get_model_class

__all__ = ["SUPPORTED_ARCHITECTURES", "get_model_class"]
