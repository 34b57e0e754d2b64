"""torch.distributed for tensor parallelism: process-group start-up and the Communicator that the
parallel layers (model_executor/layers) reduce and gather through (communicator.py), and rank 0's
sampling (sampling.py). Nothing is imported here: one rank never loads the collectives."""
