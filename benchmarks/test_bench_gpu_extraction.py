"""Extraction throughput and batch scaling on a GPU: a Llama-shaped model of about 1B parameters
built from config (random weights, bfloat16), random-token prompts of 64 tokens, batch sizes
1, 8, 32 and 64, read at layer 12 by :class:`safeflow.HFExtractor`. Skips without CUDA."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import safeflow as sf

from conftest import MEDIANS, record

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
VOCAB, TOKENS, PROMPTS = 32000, 64, 128


@pytest.fixture(scope="module")
def llama_1b():
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=2048)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).eval()
    words = [f"w{i}" for i in range(VOCAB - 3)]
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (TOKENS,), generator=g).tolist())
             for _ in range(PROMPTS)]
    return model, fast, texts


@pytest.mark.parametrize("batch_size", [1, 8, 32, 64])
def test_gpu_extraction_throughput(benchmark, llama_1b, batch_size):
    model, tok, texts = llama_1b
    n = 32 if batch_size == 1 else PROMPTS
    ext = sf.HFExtractor(model, tok, layer=12, batch_size=batch_size, chat_template=False, progress=False)

    def run():
        H = ext.extract(texts[:n])
        torch.cuda.synchronize()
        return H

    H = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert H.shape == (n, 2048) and torch.isfinite(H).all()
    benchmark.extra_info["params"] = sum(p.numel() for p in model.parameters())
    benchmark.extra_info["prompts_per_s"] = n / benchmark.stats.stats.median
    record(benchmark, f"gpu extract per prompt, batch {batch_size:2d}", per=n)
    MEDIANS[f"gpu extract prompts/s, batch {batch_size:2d} (value/1e3)"] = n / benchmark.stats.stats.median / 1e3
