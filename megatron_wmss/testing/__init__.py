"""Helpers for testing distributed code on CPU: spawned gloo ranks with megatron parallel state."""

from megatron_wmss.platform.spawn import DistributedRunError, run_distributed

__all__ = ["DistributedRunError", "run_distributed"]
