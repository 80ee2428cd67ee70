"""Context parallelism: the process group a model's sequence is split over, and what is supported.

A model whose sequence is split over ranks (diffusers' ``enable_parallelism`` with a
``ContextParallelConfig``) is captured per rank; its graph holds ``_c10d_functional`` collectives, and
the ``reduce_metric`` pass sums the metric parts over the group read here, so that every rank takes
the same decision. Nothing here imports diffusers unless the model carries a parallel config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

c10d = torch.ops._c10d_functional


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


def check_same_call(group, call_signature: tuple) -> None:
    """Raise :class:`ParallelError` on every rank if the ranks call the model with different input
    signatures (:func:`~adacache_fx.capture.signature`: shapes, dtypes, constants): their graphs, and the
    collectives in them, would differ and the ranks would wait on each other until the process group's
    timeout. One ``all_gather_object`` per new signature, at capture time (never during a generation)."""
    calls = [None] * dist.get_world_size(group)
    dist.all_gather_object(calls, call_signature, group=group)
    for rank, call in enumerate(calls):
        if call != calls[0]:
            spec, leaves = calls[0]
            other_spec, other_leaves = call
            diff = [(a, b) for a, b in zip(leaves, other_leaves) if a != b] or [(spec, other_spec)]
            raise ParallelError(
                f"the ranks of the context-parallel group call the model with different inputs: rank 0 "
                f"passes {diff[0][0]}, rank {rank} {diff[0][1]}; every rank must pass the same full inputs"
            )


@dataclass(frozen=True)
class SequenceShard:
    """This rank's part of a sequence split over a context-parallel group: the ``rank``-th of ``world``
    equal contiguous chunks, as diffusers splits (``tensor.chunk(world, dim)[rank]``) and gathers back
    (in rank order). A tensor laid out ``[batch, sequence, ...]`` then holds, per batch row, a contiguous
    run of the flattened row, starting ``rank`` runs in."""

    group_name: str
    rank: int
    world: int


def preceding(x: torch.Tensor, shard: SequenceShard, needed: int) -> torch.Tensor:
    """The (up to) ``needed`` elements along dim 1 that precede this rank's chunk ``x`` of a sequence
    split as ``shard`` says: ``[batch, min(needed, rank * x.shape[1])]``, in order, ending where ``x``
    starts. One functional all-gather of every rank's last ``min(needed, x.shape[1])`` elements (traced
    by torch.compile and export); every rank of the group must call it (all do: they take the same
    branch)."""
    batch, length = x.shape[0], min(needed, x.shape[1])
    tail = x[:, x.shape[1] - length:].contiguous()
    gathered = c10d.wait_tensor(c10d.all_gather_into_tensor(tail, shard.world, shard.group_name))
    before = gathered.reshape(shard.world, batch, length)[: shard.rank].permute(1, 0, 2).reshape(batch, -1)
    # tails shorter than a chunk are not contiguous: only the last one (needed long) directly precedes x
    return before[:, before.shape[1] - min(needed, before.shape[1]):]
