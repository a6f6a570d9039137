"""Reloading into layers whose weights vLLM turned into a kernel format after loading.

vLLM processes each layer after a load (``process_weights_after_loading``): on its CPU backend a linear layer's
weight goes into a packed GEMM kernel (oneDNN or sgl-kernel) and the parameter is left empty (``remove_weight=True``),
and an embedding or LM head keeps its weight but computes from a packed copy (``remove_weight=False``). Writing new
values into the parameters changes neither kernel. So a reload first gives each emptied parameter storage again, at
the shape vLLM recorded when it built the model (the records its own ``reload_weights`` restores from), and after the
read processes every layer it wrote into once more, as vLLM's loaders do after a first load. The vLLM internals used
here (``reload.layerwise`` / ``reload.meta``, vLLM 0.32) sit behind these two functions only.
"""

from __future__ import annotations

import torch
from torch import nn


def restore_emptied_layers(model: nn.Module, device: torch.device) -> int:
    """Allocates again, at their recorded shapes, the parameters a kernel format emptied; returns how many layers
    had such parameters."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
    from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

    restored = 0
    for module in model.modules():
        recorded, _ = get_layerwise_info(module).restore_metadata
        emptied = {
            name: meta
            for name, meta in recorded.items()
            if name in module._parameters and tuple(module._parameters[name].shape) != tuple(meta.shape)
        }
        for name, meta in emptied.items():
            with torch.device(device):
                param = materialize_meta_tensor(restore_layer_refs(meta, module))
            delattr(module, name)
            module.register_parameter(name, param)
        restored += bool(emptied)
    return restored


def process_again(model: nn.Module, written: set[str]) -> int:
    """Each layer that owns a parameter named in ``written`` into its kernel format once more (its quant method's
    ``process_weights_after_loading``, as after a first load); returns how many layers were processed."""
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    processed = 0
    for name, module in model.named_modules():
        quant_method = getattr(module, "quant_method", None)
        owns = any((f"{name}.{p}" if name else p) in written for p in module._parameters)
        if isinstance(quant_method, QuantizeMethodBase) and owns:
            quant_method.process_weights_after_loading(module)
            processed += 1
    return processed
