"""Models larger than memory: placements across device, host RAM and disk, and the streaming executor."""

from __future__ import annotations

import logging

import torch
from torch import nn

from roofline.config import EngineConfig, ModelConfig
from roofline.errors import ConfigError
from roofline.offload.executor import StreamingExecutor
from roofline.offload.placement import LayerPlacement, Tier, parse_placement
from roofline.offload.plan import OffloadPlan, plan_for_source, plan_offload
from roofline.offload.store import LayerStore

logger = logging.getLogger("roofline")


def prepare_offload(model: nn.Module, model_config: ModelConfig, source, config: EngineConfig,
                    device: torch.device, dtype: torch.dtype, is_quantized: bool
                    ) -> tuple[OffloadPlan | None, StreamingExecutor | None]:
    """Plan the placement for `config.offload` and, when layers leave the device, the executor that streams them.

    Called after the model is built (its tensors unwritten) and before its weights load. The KV
    budget comes out of the same memory limit: it is written into `config.cache.memory_bytes`.
    """
    plan = plan_for_source(source, model_config, config.offload, str(dtype).removeprefix("torch."), is_quantized,
                           device.type == "cuda", config.scheduler.max_model_len, config.scheduler.max_num_seqs,
                           config.cache.memory_bytes)
    if plan is None:
        return None, None
    logger.info("%s", plan.describe())
    if plan.kv_bytes is not None:
        if plan.kv_bytes <= 0:
            raise ConfigError(f"--memory-limit leaves no room for the KV cache with offload "
                              f"{plan.placement.describe()}")
        config.cache.memory_bytes = plan.kv_bytes
    if not plan.placement.offloaded_layers:
        return plan, None
    if config.device.compile:
        raise ConfigError("--compile cannot be combined with offloaded layers (their weights change per "
                          "forward); drop --compile or use --offload none")
    store = LayerStore(config.offload.directory, pin_host=device.type == "cuda")
    return plan, StreamingExecutor(model.model.layers, plan.placement, store, device)


__all__ = ["LayerPlacement", "LayerStore", "OffloadPlan", "StreamingExecutor", "Tier", "parse_placement",
           "plan_offload", "prepare_offload"]
