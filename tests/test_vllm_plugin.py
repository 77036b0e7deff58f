"""The vLLM plugin's install story, without vLLM: the entry point vLLM loads is in the installed
metadata, and an environment that hides it is refused before an engine could serve requests that
ask for steering unsteered."""

from __future__ import annotations

import importlib.metadata

import pytest

import safeflow as sf
from safeflow.integrations import vllm as integration


def test_the_installed_metadata_holds_the_plugin_entry_point():
    points = importlib.metadata.entry_points(group=integration.PLUGIN_GROUP)
    assert [ep.value for ep in points if ep.name == "safeflow"] == ["safeflow.integrations.vllm:register"]
    assert callable(integration.register)
    args = integration.engine_args({"refusal": "runs/refusal.safetensors"}, layer=20)
    assert args == {"additional_config": {"safeflow": {"constraints": {"refusal": "runs/refusal.safetensors"},
                                                       "layer": 20, "check_provenance": True}}}


def test_an_environment_without_the_entry_point_is_refused(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])
    with pytest.raises(sf.ConfigError, match="vLLM would not load safeflow's plugin.*pip install -e"):
        integration.engine_args({"refusal": "runs/refusal.safetensors"})
