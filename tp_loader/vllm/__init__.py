"""tp_loader as a vLLM model loader: ``LLM(..., load_format="tp_loader")``, ``vllm serve --load-format tp_loader``.

A room of its own: nothing else in tp_loader imports this package, and importing it imports no vLLM module;
vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in every process it starts.
"""

from __future__ import annotations

LOAD_FORMAT = "tp_loader"


def register() -> None:
    """Registers the loader with vLLM's model-loader registry under :data:`LOAD_FORMAT` (idempotent).

    Raises:
        ImportError: vLLM is not installed, or is too old to take out-of-tree loaders (no ``register_model_loader``).
    """
    try:
        from vllm.model_executor import model_loader
    except ImportError as exc:
        raise ImportError(
            f"tp_loader's vLLM loader needs vLLM: {exc}. Install it with pip install tp_loader[vllm]"
        ) from exc
    register_model_loader = getattr(model_loader, "register_model_loader", None)
    if register_model_loader is None:
        import vllm

        raise ImportError(
            f"vLLM {getattr(vllm, '__version__', '?')} has no register_model_loader "
            "(vllm.model_executor.model_loader), so it cannot take tp_loader's loader: upgrade vLLM (0.32 is tested) "
            "or use load_format='auto'"
        )
    from .loader import make_loader_class

    registry = getattr(model_loader, "_LOAD_FORMAT_TO_MODEL_LOADER", {})
    if getattr(registry.get(LOAD_FORMAT), "__tp_loader__", False):
        return
    cls = make_loader_class()
    cls.__tp_loader__ = True
    register_model_loader(LOAD_FORMAT)(cls)
