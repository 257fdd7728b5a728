"""Tests for tl_privacy.specificity: per-type sets, overlap, cross-ablation, seesaw."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tl_privacy.data.tokenization import make_batches, pii_items
from tl_privacy.extraction import extraction_scores
from tl_privacy.localization import LocalizationConfig, ReferenceCache, localize
from tl_privacy.neurons import PrivacyNeurons
from tl_privacy.specificity import (
    cross_ablation,
    generalization,
    jaccard_matrix,
    localize_by_type,
    measure_specificity,
    seesaw,
)

QUICK = LocalizationConfig(steps=3, show_progress=False, budget=20)


def neurons_at(indices: list[int], shape=(2, 8)) -> PrivacyNeurons:
    mask = torch.zeros(shape, dtype=torch.bool).flatten()
    mask[indices] = True
    return PrivacyNeurons(mask=mask.view(shape), method="test")


def test_jaccard_matrix_of_constructed_sets():
    sets = {"A": neurons_at([0, 1, 2, 3]), "B": neurons_at([2, 3, 4, 5]), "C": neurons_at([9])}
    matrix = jaccard_matrix(sets)

    assert matrix["A"]["A"] == 1.0
    assert matrix["A"]["B"] == pytest.approx(2 / 6)
    assert matrix["B"]["A"] == matrix["A"]["B"]
    assert matrix["A"]["C"] == 0.0


def test_localize_by_type_targets_each_type(tiny_model, tiny_tokenizer, synthetic_corpus):
    batches = make_batches(tiny_tokenizer, synthetic_corpus.train[:4], batch_size=4)
    sets = localize_by_type(tiny_model, batches, QUICK, types=("PHONE", "EMAIL"))

    assert list(sets) == ["PHONE", "EMAIL"]
    assert sets["PHONE"].pii_types == ("PHONE",)
    assert sets["EMAIL"].pii_types == ("EMAIL",)


def test_localize_by_type_default_types(tiny_model, tiny_tokenizer, synthetic_corpus):
    batches = make_batches(tiny_tokenizer, synthetic_corpus.train[:2], batch_size=2)
    sets = localize_by_type(tiny_model, batches, QUICK)
    assert list(sets) == ["EMAIL", "PHONE", "NAME", "ADDRESS"]


def test_localize_by_type_shares_references_of_one_dict(
    tiny_model, tiny_tokenizer, synthetic_corpus
):
    """A dict of whole tensors is split by batch_size in every run, so the cache matches."""
    whole = make_batches(tiny_tokenizer, synthetic_corpus.train[:4], batch_size=4)[0]
    config = dataclasses.replace(QUICK, batch_size=2, selection="budget")
    references = ReferenceCache()
    localize(tiny_model, whole, config, references=references)

    sets = localize_by_type(tiny_model, whole, config, types=("PHONE",), references=references)

    assert sorted(references.entries) == [0, 1]
    assert sets["PHONE"].stats["forward_passes"] == config.steps


def test_cross_ablation_matrix(memorized_tiny):
    model, corpus, _ = memorized_tiny
    records = corpus.train[:12]
    shape = (model.cfg.n_layers, model.cfg.d_mlp)
    everything = PrivacyNeurons(mask=torch.ones(shape, dtype=torch.bool), method="all")
    nothing = PrivacyNeurons(mask=torch.zeros(shape, dtype=torch.bool), method="none")

    result = cross_ablation(
        model,
        model.tokenizer,
        records,
        {"everything": everything, "nothing": nothing},
        include_clean=True,
    )
    clean = extraction_scores(model, pii_items(model.tokenizer, records)).by_type()

    assert list(result) == ["none", "everything", "nothing"]
    for measured, summary in clean.items():
        assert result["none"][measured] == pytest.approx(summary.exact_rate)
        assert result["nothing"][measured] == pytest.approx(summary.exact_rate)
        assert result["everything"][measured] < summary.exact_rate


def test_seesaw_reports_before_and_after(memorized_tiny):
    model, corpus, _ = memorized_tiny
    shape = (model.cfg.n_layers, model.cfg.d_mlp)
    all_of_layer_0 = torch.zeros(shape, dtype=torch.bool)
    all_of_layer_0[0] = True
    neurons = PrivacyNeurons(mask=all_of_layer_0, method="layer0")

    result = seesaw(model, model.tokenizer, corpus.train[:8], corpus.train[8:16], neurons)

    for group in ("localized", "other"):
        values = result[group]
        assert values["n_items"] > 0
        assert values["before"] > 0.8
        assert values["after"] < values["before"]
        assert values["change"] == pytest.approx(values["after"] - values["before"])
        assert set(values["by_type"]) == {"NAME", "EMAIL", "PHONE", "ADDRESS"}
    json.dumps(result)


def test_seesaw_with_no_other_records(tiny_model, tiny_tokenizer, synthetic_corpus):
    neurons = neurons_at([0], shape=(tiny_model.cfg.n_layers, tiny_model.cfg.d_mlp))
    result = seesaw(tiny_model, tiny_tokenizer, synthetic_corpus.train[:2], [], neurons)
    assert result["other"]["n_items"] == 0
    assert result["other"]["before"] is None


def test_generalization_splits_records(tiny_model, tiny_tokenizer, synthetic_corpus):
    records = synthetic_corpus.train[:6]
    result = generalization(tiny_model, tiny_tokenizer, records, QUICK, seed=1)

    assert result["n_localized_records"] == 3
    assert result["n_other_records"] == 3
    assert 0 <= result["n_neurons"] <= 20
    assert {"localized", "other"} <= set(result)

    with pytest.raises(ValueError, match="fraction"):
        generalization(tiny_model, tiny_tokenizer, records, QUICK, fraction=1.0)


def test_measure_specificity_summary(tiny_model, tiny_tokenizer, synthetic_corpus):
    result = measure_specificity(
        tiny_model, tiny_tokenizer, synthetic_corpus.train[:3], QUICK, types=("PHONE", "NAME")
    )
    summary = result.to_dict()

    assert summary["types"] == ["PHONE", "NAME"]
    assert set(summary["jaccard"]) == {"PHONE", "NAME"}
    assert set(summary["cross_ablation"]) == {"none", "PHONE", "NAME"}
    assert all(len(layers) == tiny_model.cfg.n_layers for layers in summary["by_layer"].values())
    json.dumps(summary)
