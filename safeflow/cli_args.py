"""Argument parsing of the ``safeflow`` command: the parser class and the ``type=`` validators.

The validators run at parse time, before any model is loaded: each takes the argument's text and
returns the value (an int, a float, a checked path, a registered name, a ``(key, value)`` pair) or
raises ``argparse.ArgumentTypeError`` with the reason and the fix, which :class:`Parser` reports as
one line ``safeflow: error: ...`` (exit status 2) via :class:`UsageError`. :mod:`safeflow.cli`
builds the subcommands' parsers from them. The validators that consult the library (models,
registries, presets) import it inside the function: building the parser must not import torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .errors import SafeflowError

__all__ = ["Parser", "UsageError", "data_source", "features_path", "fraction", "gate_source", "input_file", "key_value",
           "model_name", "nonnegative_float", "nonnegative_int", "output_dir", "output_file", "positive_int",
           "preset_name", "registered", "run_directory", "steerer_entry", "steerer_options", "steerer_source",
           "text_file"]


class UsageError(SafeflowError):
    """A command-line argument is invalid."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that raises :class:`UsageError` instead of printing usage and exiting;
    :func:`main` reports it as one line (exit status 2). Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# --- argument validators (argparse ``type=``): run at parse time, before any model is loaded ---
def _checked(check: Callable[[str], Any]) -> Callable[[str], Any]:
    def wrapped(text: str) -> Any:
        try:
            return check(text)
        except (SafeflowError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    wrapped.__name__, wrapped.__doc__ = check.__name__, check.__doc__
    return wrapped


def _number(text: str, kind: type, low: float, strict: bool = False) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ValueError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
    return value


positive_int = _checked(lambda t: _number(t, int, 1))


@_checked
def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = _number(text, float, 0.0, strict=True)
    if value >= 1:
        raise ValueError(f"must be < 1, got {text}")
    return value


nonnegative_int = _checked(lambda t: _number(t, int, 0))
nonnegative_float = _checked(lambda t: _number(t, float, 0.0))


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _creatable(path: Path) -> None:
    """Raise ValueError unless ``path`` can be created (its nearest existing ancestor is a writable directory)."""
    base = _nearest_existing(path.parent.absolute())
    if not base.is_dir():
        raise ValueError(f"cannot create {path}: {base} is a file, not a directory; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create {path}: {base} is not writable; choose a writable location")


@_checked
def input_file(text: str) -> str:
    """An existing, readable file."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise ValueError(f"{text} is a directory; pass a file")
    if not path.is_file():
        raise ValueError(f"{text} does not exist; pass an existing file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{text} is not readable; fix its permissions")
    return str(path)


@_checked
def text_file(text: str) -> str:
    """An existing UTF-8 text file."""
    path = input_file(text)
    try:
        Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{text} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return path


@_checked
def output_file(text: str) -> str:
    """A file path that can be written (an existing file is replaced)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise ValueError(f"{text} is a directory; pass a file path such as {Path(text) / 'out.safetensors'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{text} is not writable; choose another path")
    _creatable(path)
    return str(path)


@_checked
def output_dir(text: str) -> str:
    """A directory that exists or can be created."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{text} is a file; pass a directory")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{text} is not writable; choose another directory")
    else:
        _creatable(path)
    return str(path)


@_checked
def run_directory(text: str) -> str:
    """An existing directory (a run directory of ``safeflow demo``)."""
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(f"{text} does not exist; pass the --out directory of `safeflow demo`")
    if not path.is_dir():
        raise ValueError(f"{text} is a file; pass the run directory that holds it")
    return str(path)


@_checked
def model_name(text: str) -> str:
    """A default model name, a local model directory or a Hugging Face id."""
    from .models import resolve_model

    resolve_model(text)
    return text


@_checked
def features_path(text: str) -> str:
    """A features file, or a directory of them (streamed with ``--chunk-rows``)."""
    return str(Path(text).expanduser()) if Path(text).expanduser().is_dir() else input_file(text)


@_checked
def data_source(text: str) -> str:
    """``default`` or a prompt file."""
    return text if text == "default" else input_file(text)


@_checked
def gate_source(text: str) -> str:
    """``prompt``, ``token`` or a constraint-set file."""
    return text if text in ("prompt", "token") else input_file(text)


def registered(kind: str) -> Callable[[str], str]:
    """A name registered in the ``kind`` registry (``constraint``, ``steerer`` or ``attack``)."""
    @_checked
    def name(text: str) -> str:
        from . import available

        names = available()[kind]
        if text not in names:
            raise ValueError(f"unknown {kind} {text!r}; valid: {', '.join(names)}")
        return text
    return name


@_checked
def steerer_entry(text: str) -> str:
    """A registered steerer, optionally with the gate it is compared with: ``name[@gate]``."""
    from .recipes import parse_steerer

    parse_steerer(text)
    return text


@_checked
def steerer_source(text: str) -> str:
    """A registered steerer name or an existing saved steerer file."""
    if Path(text).expanduser().is_file():
        return str(Path(text).expanduser())
    return registered("steerer")(text)


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (``--fit-opt``, ``--steerer-opt``): VALUE read as JSON where it is JSON (``3``,
    ``0.5``, ``true``, ``null``, ``[64, 64]``, ``"text"``), else kept as the text (``cosine``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().rpartition(".")[2].isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY an option name, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


@_checked
def preset_name(text: str) -> str:
    """A preset name (:func:`safeflow.presets.preset`)."""
    from .presets import preset

    preset(text)
    return text


def steerer_options(pairs: list[tuple[str, Any]], names: list[str], name: str) -> dict[str, Any]:
    """The ``--steerer-opt`` settings of steerer ``name``: every ``KEY=VALUE`` and every
    ``NAME.KEY=VALUE`` whose NAME is ``name``; a NAME outside ``names`` (the steerers in use) is an error."""
    options: dict[str, Any] = {}
    for key, value in pairs:
        scope, _, option = key.rpartition(".")
        if scope and scope not in names:
            raise UsageError(f"--steerer-opt {key}=...: {scope!r} is not a steerer of this run ({', '.join(names)})")
        if scope in ("", name):
            options[option] = value
    return options
