"""Context parallelism: the process group a model's sequence is split over, and what is supported.

A model whose sequence is split over ranks (diffusers' ``enable_parallelism`` with a
``ContextParallelConfig``) is captured per rank; its graph holds ``_c10d_functional`` collectives, and
the ``reduce_metric`` pass sums the metric parts over the group read here, so that every rank takes
the same decision. Nothing here imports diffusers unless the model carries a parallel config.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn


class ParallelError(RuntimeError):
    """The model's parallel setup cannot be cached (no process group, an unsupported configuration)."""


def context_parallel_config(model: nn.Module):
    """The diffusers ``ContextParallelConfig`` a model runs under, or None."""
    return getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)


def context_parallel_group(model: nn.Module):
    """The process group the model's sequence is split over (all its ranks), or None for one process.

    Raises :class:`ParallelError` if torch.distributed is not initialized or the configuration is one
    this cannot run (ring attention with an attention backend that returns no log-sum-exp).
    """
    config = context_parallel_config(model)
    if config is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError(
            f"{type(model).__name__} has context parallelism enabled but torch.distributed is not "
            "initialized: call torch.distributed.init_process_group() in every rank (torchrun) first"
        )
    if (config.ring_degree or 1) > 1 and _attention_backend(model) == "native":
        raise ParallelError(
            f"ContextParallelConfig(ring_degree={config.ring_degree}) needs an attention backend that returns "
            "the log-sum-exp (e.g. flash or cuDNN on GPU); the 'native' backend does not (it is the one on "
            "CPU). Use ulysses_degree instead, or set a backend with model.set_attention_backend(...)"
        )
    mesh = getattr(config, "_flattened_mesh", None)
    return mesh.get_group() if mesh is not None else None


def _attention_backend(model: nn.Module) -> str | None:
    """The attention backend of the model's first attention processor that names one (diffusers)."""
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(processor, "_attention_backend"):
            continue
        backend = processor._attention_backend
        if backend is None:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            backend, _ = _AttentionBackendRegistry.get_active_backend()
        return getattr(backend, "value", backend)
    return None
