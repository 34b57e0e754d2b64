"""torch.distributed for tensor parallelism: process-group start-up and the Communicator that the
parallel layers (model_executor/layers) reduce and gather through."""

from pagedserve.distributed.communicator import (
    TorchDistributedCommunicator,
    init_tensor_parallel,
    shutdown_tensor_parallel,
    worker_environment,
)

__all__ = [
    "TorchDistributedCommunicator",
    "init_tensor_parallel",
    "shutdown_tensor_parallel",
    "worker_environment",
]
