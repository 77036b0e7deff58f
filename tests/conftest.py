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


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # words joined by spaces, also after save/load
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


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
