import json
import math
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from online_merging.merging import open_weights
from online_merging.offline import MergeSpec, merge, save_merged
from online_merging.offline.mergekit import mergekit_config, run_mergekit

LAYERS = 4
ATOL = 1e-6  # float32 against mergekit: the same operations, rounding of the L1 rescale's sums aside


def _tiny_llama(layers: int = LAYERS) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).float()


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(50)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Checkpoints: base, sft = base + noise, aligned = sft + noise (float32, with a tokenizer), a 3-layer base."""
    root = tmp_path_factory.mktemp("offline")
    torch.manual_seed(0)
    model = _tiny_llama()
    for role in ("base", "sft", "aligned"):
        if role != "base":
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / role)
        _tokenizer().save_pretrained(root / role)
    _tiny_llama(LAYERS - 1).save_pretrained(root / "short")
    return {role: root / role for role in ("base", "sft", "aligned", "short")}


def _load(path) -> dict[str, torch.Tensor]:
    weights = open_weights(path)
    return {name: weights.get(name) for name in weights}


def _assert_equal(actual: dict, expected: dict, atol: float = 0.0) -> float:
    """Same names, every tensor within ``atol``; the largest difference."""
    assert set(actual) == set(expected)
    worst = 0.0
    for name in expected:
        diff = (actual[name].float() - expected[name].float()).abs().max().item()
        assert actual[name].dtype == expected[name].dtype and diff <= atol, f"{name}: max abs diff {diff:.3g}"
        worst = max(worst, diff)
    return worst


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


def test_ma_is_the_interpolation_and_its_ends_are_the_models(ckpt):
    sft, aligned = _load(ckpt["sft"]), _load(ckpt["aligned"])
    merged = merge(MergeSpec("ma", alpha=0.3), sft=ckpt["sft"], aligned=ckpt["aligned"])
    _assert_equal(merged, {n: 0.3 * aligned[n] + 0.7 * sft[n] for n in sft})
    _assert_equal(merge(MergeSpec("ma", alpha=0.0), sft=ckpt["sft"], aligned=ckpt["aligned"]), sft)
    _assert_equal(merge(MergeSpec("ma", alpha=1.0), sft=ckpt["sft"], aligned=ckpt["aligned"]), aligned)


def test_hma_gives_each_layer_the_ratio_of_its_block(ckpt):
    sft, aligned = _load(ckpt["sft"]), _load(ckpt["aligned"])
    equal = merge(MergeSpec("hma", ratios=(0.3, 0.3, 0.3)), sft=ckpt["sft"], aligned=ckpt["aligned"])
    _assert_equal(equal, merge(MergeSpec("ma", alpha=0.3), sft=ckpt["sft"], aligned=ckpt["aligned"]))

    ratios = (0.1, 0.5, 0.9)
    merged = merge(MergeSpec("hma", ratios=ratios), sft=ckpt["sft"], aligned=ckpt["aligned"])
    block_of_layer = {0: 0, 1: 0, 2: 1, 3: 2}  # ⌊i·3/4⌋
    outside = {"model.embed_tokens.weight": 0, "model.norm.weight": 2, "lm_head.weight": 2}
    assert {n for n in sft if _layer_of(n) is None} == set(outside)
    for name in sft:
        layer = _layer_of(name)
        ratio = ratios[outside[name] if layer is None else block_of_layer[layer]]
        torch.testing.assert_close(merged[name], ratio * aligned[name] + (1 - ratio) * sft[name], rtol=0, atol=0)


def test_saved_merge_loads_with_transformers_in_one_or_several_shards(ckpt, tmp_path):
    spec = MergeSpec("hma", ratios=(0.2, 0.8))
    expected = merge(spec, sft=ckpt["sft"], aligned=ckpt["aligned"])
    for out, max_shard_bytes, shards in ((tmp_path / "one", 2**30, 1), (tmp_path / "many", 4096, None)):
        save_merged(spec, out, sft=ckpt["sft"], aligned=ckpt["aligned"], max_shard_bytes=max_shard_bytes)
        files = sorted(out.glob("*.safetensors"))
        if shards == 1:
            assert [f.name for f in files] == ["model.safetensors"]
        else:
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
        assert (out / "tokenizer.json").is_file() and json.loads((out / "merge.json").read_text())["method"] == "hma"
        loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
        _assert_equal(loaded, expected)


def test_saving_again_into_the_same_directory_replaces_the_weights(ckpt, tmp_path):
    models = {"sft": ckpt["sft"], "aligned": ckpt["aligned"]}
    save_merged(MergeSpec("ma", alpha=0.0), tmp_path, **models)
    save_merged(MergeSpec("ma", alpha=1.0), tmp_path, max_shard_bytes=4096, **models)
    _assert_equal(AutoModelForCausalLM.from_pretrained(tmp_path).state_dict(), _load(ckpt["aligned"]))


@pytest.mark.parametrize(
    "spec",
    [
        MergeSpec("linear", weights=(0.7, 1.3)),
        MergeSpec("ties", weights=(0.7, 1.3), density=0.3),
        MergeSpec("ma", alpha=0.3),
        MergeSpec("hma", ratios=(0.2, 0.6, 0.9)),
        MergeSpec("dare", weights=(0.7, 1.3), density=1.0),
    ],
    ids=lambda spec: spec.method,
)
def test_mergekit_computes_the_same_merge(ckpt, tmp_path, spec):
    models = {"sft": ckpt["sft"], "aligned": ckpt["aligned"], "base": ckpt["base"]}
    out = run_mergekit(mergekit_config(spec, **models), tmp_path / "mergekit")
    assert (out / "tokenizer.json").is_file()
    _assert_equal(_load(out), merge(spec, **models), atol=ATOL)


@pytest.mark.parametrize("which", [0, 1], ids=["sft", "aligned"])
def test_dare_keeps_the_l1_norm_of_each_delta_as_mergekit_does(ckpt, tmp_path, which):
    """The masks differ by design (ours is the counter-based draw): each model's delta, alone with weight 1,
    keeps its L1 norm in both, with about ``density`` of its elements."""
    density, weights = 0.3, (1.0, 0.0) if which == 0 else (0.0, 1.0)
    spec = MergeSpec("dare", weights=weights, density=density, seed=3)
    models = {"sft": ckpt["sft"], "aligned": ckpt["aligned"], "base": ckpt["base"]}
    ours = merge(spec, **models)
    theirs = _load(run_mergekit(mergekit_config(spec, **models), tmp_path / "mergekit"))
    base, model = _load(ckpt["base"]), _load(models[("sft", "aligned")[which]])
    kept = total = 0
    for name in base:
        delta = model[name] - base[name]
        for merged in (ours[name], theirs[name]):
            torch.testing.assert_close((merged - base[name]).abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
        kept, total = kept + (ours[name] != base[name]).sum().item(), total + delta.numel()
    assert abs(kept - density * total) <= 5 * math.sqrt(total * density * (1 - density))


def test_mergekit_config_filters_and_parameters(ckpt):
    config = mergekit_config(MergeSpec("hma", ratios=(0.2, 0.9)), sft=ckpt["sft"], aligned=ckpt["aligned"])
    assert config["merge_method"] == "linear" and config["base_model"] == str(ckpt["sft"])
    assert config["dtype"] == config["out_dtype"] == "float32"
    sft_weight = config["models"][0]["parameters"]["weight"]
    assert [f["filter"] for f in sft_weight[:LAYERS]] == [f"model.layers.{i}." for i in range(LAYERS)]
    assert {f["filter"]: f["value"] for f in sft_weight[LAYERS:]} == pytest.approx(
        {"model.embed_tokens.weight": 0.8, "model.norm.weight": 0.1, "lm_head.weight": 0.1}
    )
    spec = MergeSpec("ties", weights=(0.7, 1.3), density=0.3)
    ties = mergekit_config(spec, sft=ckpt["sft"], aligned=ckpt["aligned"], base=ckpt["base"])
    assert ties["merge_method"] == "ties" and ties["base_model"] == str(ckpt["base"])
    assert [m["parameters"] for m in ties["models"]] == [
        {"weight": 0.7, "density": 0.3},
        {"weight": 1.3, "density": 0.3},
    ]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (MergeSpec("hma", ratios=(0.5, 1.2)), r"Invalid ratios: 1\.2"),
        (MergeSpec("hma", ratios=(-0.1,)), r"Invalid ratios: -0\.1"),
        (MergeSpec("hma", ratios=(0.5,) * (LAYERS + 1)), r"Invalid ratios: 5 blocks for a model of 4 layers"),
        (MergeSpec("ties", density=0.0), r"Invalid density: 0\.0"),
        (MergeSpec("dare", density=1.5), r"Invalid density: 1\.5"),
        (MergeSpec("linear", weights=(1.0, -1.0)), r"Invalid weights: \(1\.0, -1\.0\) \(they sum to 0"),
        (MergeSpec("ma", alpha=None), r"Invalid alpha: None"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(ckpt, spec, match):
    models = {"sft": ckpt["sft"], "aligned": ckpt["aligned"], "base": ckpt["base"]}
    for build in (merge, mergekit_config):
        with pytest.raises(ValueError, match=match):
            build(spec, **models)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_task_vector_methods_need_a_base(ckpt, method):
    for build in (merge, mergekit_config):
        with pytest.raises(ValueError, match=f"method '{method}' merges task vectors: it needs the base model"):
            build(MergeSpec(method), sft=ckpt["sft"], aligned=ckpt["aligned"])


def test_checkpoints_that_do_not_match_are_refused_naming_the_tensor(ckpt):
    with pytest.raises(ValueError, match=r"sft and base models do not match: only in sft: model\.layers\.3\."):
        merge(MergeSpec("ties", density=0.5), sft=ckpt["sft"], aligned=ckpt["aligned"], base=ckpt["short"])


def test_run_mergekit_without_mergekit_names_the_install_command(monkeypatch, tmp_path):
    for module in ("mergekit", "mergekit.config", "mergekit.merge"):
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: the import fails
    with pytest.raises(ImportError, match="pip install mergekit"):
        run_mergekit({}, tmp_path)
