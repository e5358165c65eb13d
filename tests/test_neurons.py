import copy
import math

import pytest
import torch
from torch import nn
from trl import DPOConfig, DPOTrainer

from online_merging.neurons import (
    GradientMagnitudeCallback,
    NeuronMasks,
    UpdateMagnitudeCallback,
    importance_from_weights,
    key_neuron_masks,
    load_neuron_masks,
    locate_key_neurons,
    neuron_layout,
    probe_importances,
    save_neuron_masks,
    snapshot,
)
from online_merging.world.tokenizer import build_tokenizer
from tests.conftest import preference_data, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_importance_is_the_row_sum_of_the_update_plus_the_bias_element_over_lr():
    before = {
        "lin.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
        "lin.bias": torch.tensor([0.0, 0.0, 0.0]),
        "norm.weight": torch.tensor([1.0, 1.0]),
        "scale": torch.tensor(2.0),
    }
    after = {
        "lin.weight": torch.tensor([[1.5, 1.0], [3.0, 4.0], [5.0, 8.0]]),
        "lin.bias": torch.tensor([0.0, -0.25, 1.0]),
        "norm.weight": torch.tensor([9.0, 9.0]),
        "scale": torch.tensor(7.0),
    }
    found = importance_from_weights(before, after, lr=0.5)
    assert set(found) == {"lin.weight"}  # norms and scalars are not neurons; the bias is folded into its rows
    # rows: |0.5| + |−1| + |0| = 1.5; 0 + |−0.25| = 0.25; |2| + |1| = 3; all / 0.5
    torch.testing.assert_close(found["lin.weight"], torch.tensor([3.0, 0.5, 6.0]))
    with pytest.raises(ValueError, match="lr"):
        importance_from_weights(before, after, lr=0.0)


def test_layout_counts_tied_weights_once_and_matches_biases_by_prefix():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 5, bias=False))
    head = nn.Linear(4, 5, bias=False)
    head.weight = model[0].weight  # tied to the embedding
    model.append(head)
    layout = neuron_layout(model.state_dict())  # a live state dict: the tie shares storage
    assert layout == {"0.weight": None, "1.weight": "1.bias", "3.weight": None}
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    found = importance_from_weights(before, model.state_dict(), lr=1.0)
    torch.testing.assert_close(found["0.weight"], torch.full((5,), 4.0))
    assert "4.weight" not in found and set(snapshot(model)) == {n for n, _ in model.named_parameters()}


def test_planted_rows_move_most_and_are_selected():
    """y depends on hidden units 2, 5, 11 only (the readout is ~0 elsewhere): SGD moves those rows most."""
    g = torch.Generator().manual_seed(0)
    hidden, readout = nn.Linear(8, 16), nn.Linear(16, 1, bias=False)
    planted = [2, 5, 11]
    with torch.no_grad():
        readout.weight.fill_(0.01)
        readout.weight[0, planted] = torch.tensor([1.0, -1.5, 2.0])
    readout.requires_grad_(False)
    model = nn.Sequential(hidden, nn.Tanh(), readout)
    x = torch.randn(64, 8, generator=g)
    y = torch.randn(64, 1, generator=g)
    before, lr = snapshot(model), 0.05
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    importance = importance_from_weights(before, snapshot(model), lr)
    assert importance["2.weight"].sum() == 0  # frozen readout
    top = torch.argsort(importance["0.weight"], descending=True)[:3]
    assert sorted(top.tolist()) == planted
    masks = key_neuron_masks(importance, k=0.15, biases=["0.bias"])  # ceil(0.15 · 17) = 3
    assert masks["0.weight"].nonzero().flatten().tolist() == planted
    assert torch.equal(masks["0.bias"], masks["0.weight"]) and not masks["2.weight"].any()


def test_key_neuron_masks_global_versus_layer_with_deterministic_ties():
    importance = {"b": torch.tensor([5.0, 1.0, 1.0, 0.0]), "a": torch.tensor([1.0, 9.0])}
    # global: ceil(0.5 · 6) = 3 → 9 (a[1]), 5 (b[0]), then the tie 1.0 goes to "a" (name) before b[1], b[2]
    glob = key_neuron_masks(importance, k=0.5)
    assert glob["a"].tolist() == [True, True] and glob["b"].tolist() == [True, False, False, False]
    assert isinstance(glob, NeuronMasks) and glob.k == 0.5 and glob.scope == "global"
    # layer: ceil(0.5 · 4) = 2 of b (5, then the first 1.0), ceil(0.5 · 2) = 1 of a
    layer = key_neuron_masks(importance, k=0.5, scope="layer")
    assert layer["a"].tolist() == [False, True] and layer["b"].tolist() == [True, True, False, False]
    # every parameter keeps at least one row under "layer"; k = 1 keeps everything
    assert all(m.sum() == 1 for m in key_neuron_masks(importance, k=0.01, scope="layer").values())
    assert sum(int(m.sum()) for m in key_neuron_masks(importance, k=0.01).values()) == 1
    assert all(m.all() for m in key_neuron_masks(importance, k=1.0).values())
    with_bias = key_neuron_masks({"l.weight": torch.tensor([0.0, 1.0])}, k=0.5, biases=["l.bias", "x.bias", "l.w"])
    assert set(with_bias) == {"l.weight", "l.bias"} and with_bias["l.bias"].tolist() == [False, True]


@pytest.mark.parametrize("k", [0, -0.1, 1.5, True, "0.1"])
def test_invalid_k_is_named(k):
    with pytest.raises(ValueError, match="Invalid k"):
        key_neuron_masks({"a": torch.ones(3)}, k=k)


def test_invalid_scope_and_method_are_named(tokenizer):
    with pytest.raises(ValueError, match="Invalid scope: 'layers'"):
        key_neuron_masks({"a": torch.ones(3)}, scope="layers")
    with pytest.raises(ValueError, match="Invalid method: 'grad'"):
        locate_key_neurons(tiny_llama(), preference_data(2), tokenizer, method="grad")
    with pytest.raises(ValueError, match="Invalid embeddings"):
        locate_key_neurons(tiny_llama(), preference_data(2), tokenizer, embeddings="keep")
    with pytest.raises(ValueError, match="Invalid k"):
        locate_key_neurons(tiny_llama(), preference_data(2), tokenizer, k=2)


def test_save_load_round_trip_and_errors(tmp_path):
    masks = key_neuron_masks({"x.weight": torch.arange(7.0), "y.weight": torch.zeros(3)}, k=0.3, scope="layer")
    path = tmp_path / "masks.safetensors"
    save_neuron_masks(masks, path)
    loaded = load_neuron_masks(path)
    assert set(loaded) == set(masks) and all(torch.equal(loaded[n], masks[n]) for n in masks)
    assert all(m.dtype == torch.bool for m in loaded.values())
    assert loaded.k == 0.3 and loaded.scope == "layer"

    from safetensors.torch import load_file, save_file

    assert all(t.dtype == torch.uint8 for t in load_file(path).values())
    save_neuron_masks({"z": torch.tensor([True, False])}, tmp_path / "plain.safetensors")
    plain = load_neuron_masks(tmp_path / "plain.safetensors")
    assert plain.k is None and plain.scope is None and plain["z"].tolist() == [True, False]

    with pytest.raises(FileNotFoundError, match="No neuron-mask file"):
        load_neuron_masks(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="not a neuron-mask file"):
        load_neuron_masks(tmp_path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a neuron-mask file"):
        load_neuron_masks(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="1-D bool"):
        save_neuron_masks({"w": torch.zeros(2)}, tmp_path / "bad.safetensors")


def _dpo_run(tmp_path, name, callbacks, steps=3):
    model = tiny_llama()
    args = DPOConfig(
        output_dir=str(tmp_path / name), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_pin_memory=False,
        use_cpu=True, bf16=False, seed=0, beta=0.1, activation_checkpointing=False, max_length=32,
        lr_scheduler_type="constant",
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=preference_data(16),
        processing_class=build_tokenizer(), callbacks=callbacks,
    )  # fmt: skip
    before = snapshot(model)
    trainer.train()
    return before, model


def test_callbacks_leave_training_unchanged_and_sum_per_step_updates(tmp_path):
    _, plain = _dpo_run(tmp_path, "plain", None)
    updates, grads, first = UpdateMagnitudeCallback(), GradientMagnitudeCallback(2), UpdateMagnitudeCallback(1)
    before, watched = _dpo_run(tmp_path, "watched", [updates, grads, first])
    for (name, a), b in zip(plain.named_parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert (updates.steps_seen, grads.steps_seen, first.steps_seen) == (3, 2, 1)
    names = {n for n, p in watched.named_parameters() if p.dim() == 2}
    assert set(updates.importance) == set(grads.importance) == names
    total = importance_from_weights(before, snapshot(watched), lr=1.0)
    for n in names:  # Σ_t |Δθ_t| ≥ |θ_3 − θ_0| row by row (triangle inequality), and > 0 somewhere
        assert bool((updates.importance[n] >= total[n] - 1e-6).all()), n
        assert first.importance[n].le(updates.importance[n] + 1e-6).all()
    assert all(grads.importance[n].sum() > 0 for n in names)


def test_locate_key_neurons_on_a_tiny_llama(tokenizer):
    model = tiny_llama()
    state = copy.deepcopy(model.state_dict())
    data = preference_data(16)
    settings = dict(steps=3, learning_rate=1e-3, batch_size=8, max_length=32)
    rng = torch.get_rng_state()
    masks = locate_key_neurons(model, data, tokenizer, **settings)
    assert torch.equal(torch.get_rng_state(), rng)
    for n, t in model.state_dict().items():
        assert torch.equal(t, state[n]), n
    params = dict(model.named_parameters())
    assert set(masks) == {n for n, p in params.items() if p.dim() == 2}
    assert all(m.dtype == torch.bool and m.shape == (params[n].shape[0],) for n, m in masks.items())
    assert not masks["model.embed_tokens.weight"].any()  # embeddings="freeze"
    ranked = [n for n in masks if n != "model.embed_tokens.weight"]
    rows = sum(masks[n].numel() for n in ranked)
    assert sum(int(masks[n].sum()) for n in ranked) == math.ceil(0.1 * rows)
    again = locate_key_neurons(model, data, tokenizer, **settings)
    assert list(again) == list(masks) and all(torch.equal(again[n], masks[n]) for n in masks)

    wide = locate_key_neurons(model, data, tokenizer, per_element=True, **settings)
    assert sum(int(wide[n].sum()) for n in ranked) == math.ceil(0.1 * rows)

    layer = locate_key_neurons(model, data, tokenizer, scope="layer", method="updates", embeddings="train", **settings)
    assert "model.embed_tokens.weight" not in layer and layer.scope == "layer"
    assert all(int(m.sum()) == math.ceil(0.1 * m.numel()) for m in layer.values())
    for n, t in model.state_dict().items():
        assert torch.equal(t, state[n]), n


def test_probe_importances_of_one_run_agree_on_their_shapes(tokenizer):
    model = tiny_llama(tie=True)
    found = probe_importances(
        model, preference_data(16), tokenizer, methods=("probe", "updates", "gradients"), steps=2,
        learning_rate=1e-3, batch_size=8, max_length=32,
    )  # fmt: skip
    names = {n for n, p in model.named_parameters() if p.dim() == 2}
    assert "lm_head.weight" not in names  # tied: counted once, under the embedding's name
    for method in ("probe", "updates", "gradients"):
        assert set(found[method]) == names
    # Σ_t |Δθ_t| ≥ |θ_2 − θ_0| = probe · lr
    for n in names:
        assert bool((found["updates"][n] >= found["probe"][n] * 1e-3 - 1e-6).all()), n
