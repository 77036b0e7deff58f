"""Every code block in README.md and docs/*.rst runs as written, on tiny models built from config.

How: each document's ``python`` blocks run in order in one namespace, then its ``console``/``bash``
blocks' ``$ safeflow ...`` commands through :func:`safeflow.cli.main` (they must exit 0), in a
temporary working directory that holds a user's model ``my-model/`` (4 decoder layers) and
``my_prompts.csv`` (``docs/examples/my_prompts.csv``). The default model and prompts are swapped
for tiny stand-ins — ``load_model("smollm2-135m-instruct")`` returns a tiny Qwen2-style model with
a byte-level tokenizer and a ChatML template, ``load_prompts("default")`` the example CSV with
the default sources' names — so an example that hard-codes the default model's layer (20) or
hidden size fails here. Not run: console lines for other programs (``pip``, ``make``,
``accelerate``, ...), ``safeflow assets`` (downloads), ``>>>`` output lines, ``text``/``yaml``
blocks, and blocks preceded by ``.. untested: REASON`` (rst) or ``<!-- untested: REASON -->``
(Markdown), which must give a reason.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import safeflow as sf
import safeflow.data
import safeflow.models
import safeflow.splits
from safeflow.cli import main

from conftest import make_bpe_tokenizer, make_tokenizer, save_model_dir

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.rst"))]
PROMPTS = ROOT / "docs" / "examples" / "my_prompts.csv"
RUNNABLE = {"python": "python", "pycon": "python", "console": "console", "bash": "console", "shell": "console"}


@dataclass
class Block:
    path: Path
    line: int
    language: str
    code: str
    untested: str | None


def _dedent(lines: list[str]) -> str:
    body = [ln for ln in lines if ln.strip()]
    indent = min((len(ln) - len(ln.lstrip()) for ln in body), default=0)
    return "\n".join(ln[indent:] for ln in lines).strip("\n") + "\n"


def blocks(path: Path) -> list[Block]:
    """The code blocks of a Markdown (```` ```lang ````) or reStructuredText (``.. code-block::``,
    ``.. literalinclude::``) file, with the reason of a preceding ``untested`` marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = None
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        m = re.match(r"(?:\.\. untested:|<!-- untested:)\s*(.*?)\s*(?:-->)?$", prev)
        if m:
            marker = m.group(1)
            assert marker, f"{path.name}:{i}: an untested marker must give a reason"
        if path.suffix == ".md" and line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            found.append(Block(path, i + 1, line[3:].strip(), "\n".join(lines[i + 1:end]) + "\n", marker))
            i = end + 1
            continue
        m = re.match(r"(\s*)\.\. (code-block|literalinclude):: *(\S*)", line)
        if path.suffix == ".rst" and m:
            indent = len(m.group(1))
            j = i + 1
            options = {}
            while j < len(lines) and re.match(r"\s+:(\w+):\s*(.*)", lines[j]):
                key, value = re.match(r"\s+:(\w+):\s*(.*)", lines[j]).groups()
                options[key] = value
                j += 1
            if m.group(2) == "literalinclude":
                code = (path.parent / m.group(3)).read_text(encoding="utf-8")
                found.append(Block(path, i + 1, options.get("language", "text"), code, marker))
                i = j
                continue
            body = []
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                body.append(lines[j])
                j += 1
            found.append(Block(path, i + 1, m.group(3), _dedent(body), marker))
            i = j
            continue
        i += 1
    return found


def python_source(block: Block) -> str:
    """The code of a python block; for a ``>>>`` session, its input lines only."""
    lines = block.code.splitlines()
    if not any(ln.startswith(">>>") for ln in lines):
        return block.code
    return "\n".join(ln[4:] for ln in lines if ln.startswith((">>> ", "... ")) or ln in (">>>", "...")) + "\n"


def commands(block: Block) -> list[str]:
    """The ``$ ...`` commands of a console block, continuation lines joined."""
    out: list[str] = []
    pending: str | None = None
    for ln in block.code.splitlines():
        if pending is not None:
            pending += " " + ln.strip()
        elif ln.startswith("$ "):
            pending = ln[2:].strip()
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
        else:
            out.append(pending)
            pending = None
    return out


def run_document(path: Path, namespace: dict | None = None) -> list[str]:
    """Run the runnable blocks of ``path`` in the current directory; return the commands run."""
    namespace = namespace if namespace is not None else {"__name__": "__docs__"}
    ran: list[str] = []
    runnable = [b for b in blocks(path) if RUNNABLE.get(b.language) and b.untested is None]
    for b in runnable:
        if RUNNABLE[b.language] == "python":
            # dont_inherit: run as a user would, without this module's `from __future__ import annotations`
            exec(compile(python_source(b), f"{b.path.name}:{b.line}", "exec", dont_inherit=True), namespace)
            ran.append(f"{b.path.name}:{b.line} python")
    for b in runnable:
        if RUNNABLE[b.language] != "console":
            continue
        for command in commands(b):
            argv = shlex.split(command, comments=True)
            if argv[:1] != ["safeflow"] or argv[1:2] == ["assets"]:
                continue
            assert main(argv[1:]) == 0, f"{b.path.name}:{b.line}: `{command}` failed"
            ran.append(command)
    return ran


# --- the environment every document runs in ---------------------------------------------------
DEFAULT_SOURCES_SAFE = ("benign-everyday", "rho-gsm8k", "rho-overrefusal", "rho-refusal-50", "rho-refusal-100")
DEFAULT_SOURCES_UNSAFE = ("advbench", "strongreject", "rho-refusal-50", "rho-refusal-100")


def stand_in_prompts() -> sf.PromptSet:
    """The example prompts under the default sources' names (so the default splits exist)."""
    data = safeflow.data.load_prompt_file(PROMPTS)
    counts = {0: 0, 1: 0}
    sources = []
    for label in data.labels:
        names = DEFAULT_SOURCES_UNSAFE if label == 1 else DEFAULT_SOURCES_SAFE
        sources.append(names[counts[label] % len(names)])
        counts[label] += 1
    return sf.PromptSet(data.texts, data.labels, data.categories, sources)


MODELS = {
    "qwen2-chat": lambda: ("qwen2", make_bpe_tokenizer()),  # byte-level BPE, ChatML template, pad token
    "llama-words": lambda: ("llama", make_tokenizer(chat_template=False, pad=False)),  # word-level, no template, no pad
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {name: save_model_dir(root / name, *make()) for name, make in MODELS.items()}


@pytest.fixture
def docs_env(tmp_path, monkeypatch, model_dirs):
    """A working directory with ``my-model`` (Qwen2-style unless the test swaps it) and
    ``my_prompts.csv``; the default model and prompts replaced by tiny stand-ins."""
    real_load, real_config, real_prompts = safeflow.models.load_model, safeflow.models.model_config, \
        safeflow.data.load_prompts
    default = model_dirs["qwen2-chat"]

    def load_model(name_or_path=sf.DEFAULT_MODEL, *args, **kwargs):
        return real_load(default if name_or_path == sf.DEFAULT_MODEL else name_or_path, *args, **kwargs)

    def model_config(name_or_path, trust_remote_code=False):
        return real_config(default if name_or_path == sf.DEFAULT_MODEL else name_or_path, trust_remote_code)

    def load_prompts(name_or_path="default", sources=None):
        return stand_in_prompts() if name_or_path == "default" else real_prompts(name_or_path, sources)

    for module in (sf, safeflow.models):
        monkeypatch.setattr(module, "load_model", load_model)
    monkeypatch.setattr(safeflow.models, "model_config", model_config)
    for module in (sf, safeflow.data, safeflow.splits):
        monkeypatch.setattr(module, "load_prompts", load_prompts)
    for base in (sf.Extractor, sf.ConstraintSet, sf.Steerer, sf.Attack):  # examples may register classes
        monkeypatch.setattr(base.registry, "_classes", dict(base.registry._classes))
    monkeypatch.chdir(tmp_path)
    shutil.copy(PROMPTS, tmp_path / "my_prompts.csv")
    shutil.copytree(default, tmp_path / "my-model")
    return tmp_path


@pytest.mark.parametrize("path", [p for p in DOCS if p.name != "howto-own-model.rst"], ids=lambda p: p.name)
def test_document_examples_run(path, docs_env):
    run_document(path)


@pytest.mark.parametrize("model", list(MODELS))
def test_howto_runs_on_own_model(model, docs_env, model_dirs, capsys):
    """The how-to end to end, API and CLI, on a 4-layer Qwen2-style model with a chat template and
    on a Llama-style one with a word-level tokenizer and no pad token."""
    shutil.rmtree(docs_env / "my-model")
    shutil.copytree(model_dirs[model], docs_env / "my-model")
    namespace: dict = {"__name__": "__docs__"}
    ran = run_document(ROOT / "docs" / "howto-own-model.rst", namespace)
    assert any(c.startswith("safeflow demo") for c in ran) and any("python" in c for c in ran)
    out = capsys.readouterr().out
    assert "layer 2 of 4" in out  # the default layer of a 4-layer model
    assert "trained on layer 2 of 'my-model' but layer 0 was asked for" in out  # the refusal example
    assert "held_out:" in out and "in-distribution" in out  # train's summary; sweep/demo say what the split is
    assert namespace["poly"].provenance["layer"] == 2
    assert namespace["poly"].provenance["chat_template"] is (model == "qwen2-chat")
    saved = sf.ConstraintSet.load(docs_env / "runs" / "refusal.safetensors")  # written by `safeflow train`
    assert saved.provenance["rows"] == "responses" and saved.provenance["layer"] == 2
    assert saved.provenance["model"] == "my-model" and saved.provenance["fingerprint"]["num_layers"] == 4
    assert "held_out" in saved.provenance["training"]["metrics"] or "train" in saved.provenance["training"]["metrics"]
    report = (docs_env / "runs" / "my-demo" / "report.md").read_text()
    assert "in-distribution" in report


def test_examples_hard_code_no_layer_or_hidden_size():
    """Examples take the layer and hidden size from the model (a 4-layer model has no layer 20)."""
    for path in DOCS:
        for b in blocks(path):
            if RUNNABLE.get(b.language) and b.untested is None:
                assert not re.search(r"layer[ =]20\b|\b576\b", b.code), f"{path.name}:{b.line}"


def test_block_parser_reads_both_formats(tmp_path):
    md = tmp_path / "a.md"
    md.write_text("x\n<!-- untested: needs a GPU -->\n```python\nprint(1)\n```\n```console\n$ safeflow a \\\n  --b c\n```\n")
    rst = tmp_path / "a.rst"
    rst.write_text("T\n\n.. code-block:: python\n   :caption: c\n\n   >>> x = 1\n   >>> x\n   1\n\nafter\n")
    got = blocks(md)
    assert [(b.language, b.untested) for b in got] == [("python", "needs a GPU"), ("console", None)]
    assert commands(got[1]) == ["safeflow a --b c"]
    (r,) = blocks(rst)
    assert python_source(r) == "x = 1\nx\n"
