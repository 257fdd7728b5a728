"""PrivacyNeurons: selection, ablation hooks and storage."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests._memorized import make_tiny_model
from tl_privacy import IncompatibleNeuronsError, PrivacyNeurons
from tl_privacy.models import model_fingerprint
from tl_privacy.neurons import FINGERPRINT_DIGITS, union


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(d_mlp=64)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))


def random_scores(seed: int = 0, shape=(2, 64)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_from_scores_selects_exactly_k():
    scores = random_scores()
    for k in (0, 1, 17, 128):
        neurons = PrivacyNeurons.from_scores(scores, k, method="random")
        assert neurons.count == k
    top = PrivacyNeurons.from_scores(scores, 5, method="random")
    assert scores[top.mask].min() >= scores[~top.mask].max()


def test_from_scores_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be between 0 and 128"):
        PrivacyNeurons.from_scores(random_scores(), 129, method="random")


def test_counts_and_indices():
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, 3] = mask[1, 5] = mask[1, 63] = True
    neurons = PrivacyNeurons(mask=mask)

    assert neurons.count == 3
    assert neurons.by_layer() == [1, 2]
    assert neurons.indices() == [(0, 3), (1, 5), (1, 63)]
    assert neurons.fraction == pytest.approx(3 / 128)
    assert list(neurons.to_dataframe()["neuron"]) == [3, 5, 63]


def test_jaccard():
    a = PrivacyNeurons.from_scores(random_scores(0), 10, method="random")
    assert a.jaccard(a) == 1.0
    b = PrivacyNeurons(mask=~a.mask)
    assert a.jaccard(b) == 0.0


def test_zero_ablation_zeroes_selected(model, tokens):
    neurons = PrivacyNeurons.from_scores(random_scores(3), 20, method="random")
    captured = {}

    def capture(activation, hook):
        captured[hook.layer()] = activation
        return activation

    names = [(f"blocks.{i}.mlp.hook_post", capture) for i in range(2)]
    with torch.no_grad(), neurons.ablated(model):
        model.run_with_hooks(tokens, fwd_hooks=names)

    for layer in range(2):
        selected = neurons.mask[layer]
        assert torch.count_nonzero(captured[layer][..., selected]) == 0
        assert torch.count_nonzero(captured[layer][..., ~selected]) > 0


def test_mean_ablation_sets_means(model, tokens):
    neurons = PrivacyNeurons.from_scores(random_scores(4), 8, method="random")
    means = torch.full((2, 64), 0.25)
    captured = {}

    def capture(activation, hook):
        captured["post"] = activation
        return activation

    hooks = neurons.ablation_hooks("mean", means)
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[*hooks, ("blocks.0.mlp.hook_post", capture)])

    selected = neurons.mask[0]
    assert torch.allclose(captured["post"][..., selected], torch.tensor(0.25))


def test_mean_ablation_needs_means():
    neurons = PrivacyNeurons.from_scores(random_scores(), 3, method="random")
    with pytest.raises(ValueError, match="needs means"):
        neurons.ablation_hooks("mean")


def test_save_load_round_trip(tmp_path, model):
    scores = random_scores(5)
    neurons = PrivacyNeurons.from_scores(
        scores, 9, method="hard_concrete", model_name="tiny", pii_types=("EMAIL",)
    )
    neurons.gates = torch.rand(2, 64)
    neurons.config = {"steps": 3, "budget": 0.05}

    neurons.save(tmp_path / "set")
    loaded = PrivacyNeurons.load(tmp_path / "set", model=model)

    assert torch.equal(loaded.mask, neurons.mask)
    assert torch.equal(loaded.scores, neurons.scores)
    assert torch.equal(loaded.gates, neurons.gates)
    assert loaded.method == "hard_concrete"
    assert loaded.pii_types == ("EMAIL",)
    assert loaded.config == {"steps": 3, "budget": 0.05}
    meta = json.loads((tmp_path / "set" / "config.json").read_text())
    assert meta["format_version"] == 1
    assert meta["hook_name"] == "blocks.{layer}.mlp.hook_post"
    assert (meta["n_layers"], meta["d_mlp"]) == (2, 64)


def test_load_rejects_other_shape(tmp_path):
    other = make_tiny_model(d_mlp=32)
    PrivacyNeurons.from_scores(random_scores(), 4, method="random").save(tmp_path / "set")

    with pytest.raises(IncompatibleNeuronsError, match="d_mlp=64"):
        PrivacyNeurons.load(tmp_path / "set", model=other)
    loaded = PrivacyNeurons.load(tmp_path / "set")
    with pytest.raises(IncompatibleNeuronsError), loaded.ablated(other):
        pass


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved neuron set"):
        PrivacyNeurons.load(tmp_path / "nothing")


def test_save_replaces_whole_folder(tmp_path):
    target = tmp_path / "set"
    PrivacyNeurons.from_scores(random_scores(), 4, method="random").save(target)
    PrivacyNeurons.from_scores(random_scores(1), 7, method="random").save(target)

    assert PrivacyNeurons.load(target).count == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


# ---- model fingerprint ----


def test_fingerprint_round_trip(tmp_path, model):
    fingerprint = model_fingerprint(model)
    neurons = PrivacyNeurons.from_scores(
        random_scores(), 4, method="random", model_name="tiny", model_fingerprint=fingerprint
    )

    neurons.save(tmp_path / "set")

    meta = json.loads((tmp_path / "set" / "config.json").read_text())
    assert meta["model_fingerprint"] == fingerprint
    assert PrivacyNeurons.load(tmp_path / "set").model_fingerprint == fingerprint
    assert neurons.top_k(2).model_fingerprint == fingerprint


def test_load_without_fingerprint(tmp_path, model):
    # A set saved before the field existed: same format version, no "model_fingerprint".
    PrivacyNeurons.from_scores(random_scores(), 4, method="random").save(tmp_path / "set")
    config_path = tmp_path / "set" / "config.json"
    meta = json.loads(config_path.read_text())
    del meta["model_fingerprint"]
    config_path.write_text(json.dumps(meta))

    loaded = PrivacyNeurons.load(tmp_path / "set", model=model)

    assert loaded.model_fingerprint is None
    assert loaded.count == 4
    assert loaded.warn_if_other_weights(model) is False


def test_same_weights_no_warning(model, caplog):
    neurons = PrivacyNeurons.from_scores(
        random_scores(), 4, method="random", model_fingerprint=model_fingerprint(model)
    )

    with caplog.at_level(logging.INFO, logger="tl_privacy"):
        assert neurons.warn_if_other_weights(model) is False

    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_other_weights_warn(tmp_path, model, caplog):
    # Same shape, other seed: the set is accepted, with one warning naming both models.
    other = make_tiny_model(d_mlp=64, seed=1)
    found_on = model_fingerprint(model)
    PrivacyNeurons.from_scores(
        random_scores(), 4, method="random", model_name="base-a", model_fingerprint=found_on
    ).save(tmp_path / "set")
    loaded = PrivacyNeurons.load(tmp_path / "set", model=other)

    with caplog.at_level(logging.INFO, logger="tl_privacy"):
        warned = loaded.warn_if_other_weights(other, "tuned-b", tmp_path / "set")

    assert warned is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0]
    assert "localized on other weights" in message
    assert "'base-a'" in message
    assert "'tuned-b'" in message
    assert found_on[:FINGERPRINT_DIGITS] in message
    assert model_fingerprint(other)[:FINGERPRINT_DIGITS] in message
    assert str(tmp_path / "set") in message


def test_union_keeps_shared_fingerprint():
    a = PrivacyNeurons.from_scores(random_scores(0), 3, method="random", model_fingerprint="f1")
    b = PrivacyNeurons.from_scores(random_scores(1), 3, method="random", model_fingerprint="f1")
    c = PrivacyNeurons.from_scores(random_scores(2), 3, method="random", model_fingerprint="f2")

    assert union([a, b]).model_fingerprint == "f1"
    assert union([a, c]).model_fingerprint is None


# ---- saving next to other files, damaged folders, hook names ----


def test_save_keeps_foreign_folder(tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    neurons = PrivacyNeurons.from_scores(random_scores(), 4, method="random")

    with pytest.raises(FileExistsError, match="notes.txt"):
        neurons.save(target)

    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_save_onto_file_rejected(tmp_path):
    target = tmp_path / "set"
    target.write_text("")

    with pytest.raises(FileExistsError, match="is a file"):
        PrivacyNeurons.from_scores(random_scores(), 4, method="random").save(target)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder: (folder / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda folder: (folder / "config.json").write_text('{"format_version": 1}'), "lacks"),
        (lambda folder: (folder / "neurons.safetensors").write_bytes(b"\0" * 16), "safetensors"),
    ],
)
def test_damaged_folder_names_the_file(tmp_path, damage, message):
    target = tmp_path / "set"
    PrivacyNeurons.from_scores(random_scores(), 4, method="random").save(target)
    damage(target)

    with pytest.raises(ValueError, match=message) as error:
        PrivacyNeurons.load(target)

    assert str(target) in str(error.value)


def test_zero_ablation_rejects_means():
    neurons = PrivacyNeurons.from_scores(random_scores(), 3, method="random")

    with pytest.raises(ValueError, match="only with mode='mean'"):
        neurons.ablation_hooks("zero", means=torch.zeros(2, 64))


def test_ablation_hooks_use_hook_name():
    neurons = PrivacyNeurons.from_scores(
        random_scores(), 3, method="random", hook_name="blocks.{layer}.mlp.hook_pre"
    )

    names = [name for name, _ in neurons.ablation_hooks()]

    assert names and all(name.endswith(".mlp.hook_pre") for name in names)
    with pytest.raises(ValueError, match="'{layer}'"):
        PrivacyNeurons(mask=neurons.mask, hook_name="blocks.0.mlp.hook_post")


def test_ablation_width_mismatch_error(tokens):
    other = make_tiny_model(d_mlp=32)
    neurons = PrivacyNeurons.from_scores(random_scores(), 4, method="random")

    with pytest.raises(ValueError, match=r"64 neurons per layer.*\(2, 10, 32\)"):
        other.run_with_hooks(tokens, fwd_hooks=neurons.ablation_hooks())
