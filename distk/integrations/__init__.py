"""Integrations: thin adapters of DDP, FSDP and DeepSpeed over one :class:`CompressionState`."""

from distk.integrations.state import CompressionState, refuse_sparse_gradients

__all__ = ["CompressionState", "refuse_sparse_gradients"]
