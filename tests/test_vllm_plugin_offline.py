"""The parts of the vLLM loader that need no vLLM: its refusals and its options. The engine tests are in
tests/vllm_plugin (their own venv and CI step)."""

from __future__ import annotations

import importlib
import sys

import pytest
from torch import nn

from tp_loader.errors import ArgumentError, PlanError
from tp_loader.vllm import loader


def model_of(class_name: str, method: str | None) -> nn.Module:
    layer = nn.Linear(2, 2)
    if method is not None:
        layer.quant_method = type(method, (), {})()
    model = type(class_name, (nn.Module,), {})()
    model.proj = layer
    return model


def test_importing_the_plugin_imports_no_vllm() -> None:
    for name in [m for m in sys.modules if m == "tp_loader.vllm" or m.startswith("tp_loader.vllm.")]:
        del sys.modules[name]
    importlib.import_module("tp_loader.vllm.loader")
    assert "vllm" not in sys.modules


def test_an_unsupported_model_class_is_refused_naming_it_and_the_way_out() -> None:
    with pytest.raises(PlanError, match=r"vLLM model class Phi3ForCausalLM has no tp_loader mapping") as err:
        loader.refuse_architecture(model_of("Phi3ForCausalLM", None))
    assert "load_format='auto'" in str(err.value)


@pytest.mark.parametrize("method", ["Fp8LinearMethod", "CompressedTensorsLinearMethod", "GPTQLinearMethod"])
def test_a_quantized_model_of_a_supported_class_is_refused_not_guessed(method: str) -> None:
    with pytest.raises(PlanError, match=rf"LlamaForCausalLM is quantized \({method} \(proj\)\)") as err:
        loader.refuse_architecture(model_of("LlamaForCausalLM", method))
    assert "load_format='auto'" in str(err.value)


def test_unquantized_layers_of_a_supported_class_are_accepted() -> None:
    loader.refuse_architecture(model_of("LlamaForCausalLM", "UnquantizedLinearMethod"))
    loader.refuse_architecture(model_of("Qwen3MoeForCausalLM", None))


def test_a_misspelt_extra_config_key_is_refused_with_the_nearest_name() -> None:
    with pytest.raises(ArgumentError, match=r"unknown key 'reprot' \(did you mean 'report'\?\)"):
        loader.parse_extra({"reprot": "/tmp/r.json"})
    with pytest.raises(ArgumentError, match=r"\['report'\] is a int, not a path"):
        loader.parse_extra({"report": 3})
    assert loader.parse_extra(None) == {} and loader.parse_extra({"report": "r.json"}) == {"report": "r.json"}
