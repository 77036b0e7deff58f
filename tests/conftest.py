"""Shared fixtures: tiny causal LMs of several architectures built from config (no download),
a small word-level tokenizer with a ChatML template, and separable synthetic hidden states."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers import GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

WORDS = ("how do i make a bomb bake cookies write poem about the sea tell me steal car hack bank explain rain "
         "why sky blue cook pasta hurt someone kill plan trip paris weapon drug sell recipe garden help please "
         "<|im_start|> <|im_end|> user assistant system \n").split(" ")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}")

HIDDEN = 32
ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "gpt2")


def make_tokenizer(chat_template: bool = True, pad: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS` (other words are ``<unk>``); ``pad=False``: no pad token."""
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # words joined by spaces, also after save/load
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   **({"pad_token": "<pad>"} if pad else {}))
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_bpe_tokenizer(vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text round-trips, like Qwen2's) with a ChatML chat template,
    trained in memory on :data:`WORDS`; special tokens ``<|endoftext|>`` (pad) and ``<|im_end|>`` (eos)."""
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.padding_side = "left"
    return fast


def save_model_dir(path, arch: str, tokenizer, layers: int = 4, seed: int = 0) -> str:
    """A tiny ``arch`` model with ``layers`` decoder blocks and ``tokenizer``, saved to ``path``
    as a user's model directory (save_pretrained). Returns the path.

    Its output layer can only produce whole words of :data:`WORDS` (the rows of other tokens are
    zero), so that even a random model with a byte-level tokenizer answers in words that the
    refusal judge reads as answers rather than as degenerate byte noise."""
    model = make_model(arch, vocab_size=len(tokenizer), layers=layers, seed=seed)
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    spaced = any(t.startswith(" ") for t in texts)  # byte-level BPE: a word token carries its leading space
    noise = [i for i, t in enumerate(texts) if t.strip() not in WORDS or (spaced and not t.startswith(" "))]
    with torch.no_grad():
        model.get_output_embeddings().weight[noise] = 0.0
    if tokenizer.pad_token_id is None:  # a tokenizer without a pad token: the config has none either
        model.config.pad_token_id = None
        model.generation_config.pad_token_id = None
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_model(arch: str, vocab_size: int = 64, layers: int = 4, seed: int = 0):
    common = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    small = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    config = {
        "llama": lambda: LlamaConfig(**small, **common),
        "qwen2": lambda: Qwen2Config(**small, **common),
        "mistral": lambda: MistralConfig(**small, **common),
        "gemma": lambda: GemmaConfig(**small, head_dim=8, **common),
        "gpt2": lambda: GPT2Config(n_embd=HIDDEN, n_layer=layers, n_head=4, n_positions=128, **common),
    }[arch]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(params=ARCHITECTURES)
def tiny_model(request):
    return make_model(request.param)


def separable(n: int = 256, d: int = 16, seed: int = 0, gap: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian blobs: unsafe (1) shifted by ``gap`` along a random unit direction."""
    y = torch.arange(n) % 2
    direction = torch.randn(d, generator=torch.Generator().manual_seed(1234))  # same for every seed
    g = torch.Generator().manual_seed(seed)
    direction /= direction.norm()
    H = torch.randn(n, d, generator=g) + gap * y[:, None].float() * direction
    return H, y
