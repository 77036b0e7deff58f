"""Integrations with serving engines. Each submodule imports its engine lazily and is optional:
:mod:`safeflow.integrations.vllm` needs ``pip install safeflow[vllm]``."""
