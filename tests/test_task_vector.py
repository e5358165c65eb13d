import pytest
import torch
from safetensors.torch import save_file

from online_merging import OnlineMergingAdam, TaskVector
from online_merging.merging import canonical_name
from tests.conftest import Tiny, perturbed


def _models():
    base = Tiny()
    sft = Tiny()
    sft.load_state_dict(perturbed(base.state_dict()))
    return base, sft


def test_from_modules_is_the_difference_in_bf16_by_default():
    base, sft = _models()
    tv = TaskVector.from_models(base, sft)
    assert set(tv) == set(sft.state_dict()) - {"head.weight"}  # tied to embed.weight: kept once, as on disk
    for name, tau in tv.items():
        assert tau.dtype == torch.bfloat16
        expected = sft.state_dict()[name] - base.state_dict()[name]
        torch.testing.assert_close(tau.float(), expected, rtol=2**-8, atol=1e-6)
    exact = TaskVector.from_models(base, sft, dtype=torch.float32)
    torch.testing.assert_close(exact["hidden.weight"], sft.hidden.weight - base.hidden.weight)


def test_state_dicts_files_and_sharded_directories_give_the_same_vector(tmp_path):
    base, sft = _models()
    from_modules = TaskVector.from_models(base, sft, dtype=torch.float32)
    sd_base = {k: v.clone() for k, v in base.state_dict().items() if k != "head.weight"}  # tied: saved once
    sd_sft = {k: v.clone() for k, v in sft.state_dict().items() if k != "head.weight"}
    save_file(sd_base, tmp_path / "base.safetensors")
    shards = tmp_path / "sft"
    shards.mkdir()
    names = sorted(sd_sft)
    save_file({k: sd_sft[k] for k in names[:2]}, shards / "model-00001-of-00002.safetensors")
    save_file({k: sd_sft[k] for k in names[2:]}, shards / "model-00002-of-00002.safetensors")
    from_files = TaskVector.from_models(tmp_path / "base.safetensors", str(shards), dtype=torch.float32)
    assert set(from_files) == set(sd_sft)
    for name in from_files:
        assert torch.equal(from_files[name], from_modules[name])


def test_save_and_load_round_trip(tmp_path):
    base, sft = _models()
    tv = TaskVector.from_models(base, sft)
    tv.save(tmp_path / "tv" / "tau.safetensors")
    loaded = TaskVector.load(tmp_path / "tv" / "tau.safetensors")
    assert set(loaded) == set(tv) and all(torch.equal(loaded[k], tv[k]) for k in tv)
    assert TaskVector.fingerprints_match(loaded.fingerprint(), tv.fingerprint())
    with pytest.raises(FileNotFoundError, match="no task vector file"):
        TaskVector.load(tmp_path / "missing.safetensors")


def test_a_base_that_does_not_match_is_refused_naming_the_tensors():
    base, sft = _models()
    other = {**base.state_dict(), "hidden.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"at 'hidden.weight': shape \(2, 2\) \(base\) vs \(13, 7\) \(finetuned\)"):
        TaskVector.from_models(other, sft)
    missing = {k: v for k, v in base.state_dict().items() if k != "scale"}
    with pytest.raises(ValueError, match="only in finetuned: scale"):
        TaskVector.from_models(missing, sft)


def test_unknown_sources_fail_clearly(tmp_path):
    _base, sft = _models()
    with pytest.raises(FileNotFoundError, match=r"base model: no such file or folder: './no/such/dir'"):
        TaskVector.from_models("./no/such/dir", sft)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors file"):
        TaskVector.from_models(tmp_path / "empty", sft)
    with pytest.raises(TypeError, match="base model must be"):
        TaskVector.from_models(42, sft)


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # in case the hub library was imported already
    _base, sft = _models()
    with pytest.raises((OSError, ImportError), match="not a local path and could not be loaded from the Hugging Face"):
        TaskVector.from_models("no-such-org/no-such-model-online-merging", sft)


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("module.model.layers.0.weight", "model.layers.0.weight"),
        ("module.module._orig_mod.lm_head.weight", "lm_head.weight"),
        ("_fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.mlp.weight", "layers.0.mlp.weight"),
        ("encoder.submodule.weight", "encoder.submodule.weight"),
    ],
)
def test_canonical_names(name, canonical):
    assert canonical_name(name) == canonical


def test_optimizer_does_not_keep_the_base_model():
    import gc
    import weakref

    base, sft = _models()
    tv = TaskVector.from_models(base, sft)
    ref = weakref.ref(base.hidden.weight)
    del base
    gc.collect()
    OnlineMergingAdam(sft.named_parameters(), task_vector=tv)
    assert ref() is None


def test_a_lazy_load_reads_tensors_on_demand_and_equals_an_eager_one(tmp_path):
    tv = TaskVector.from_models(*_models())
    path = tmp_path / "tau.safetensors"
    tv.save(path)
    lazy = TaskVector.load(path, lazy=True)
    assert sorted(lazy) == sorted(tv) and len(lazy) == len(tv) and f"module.{next(iter(tv))}" in lazy
    for name in tv:
        assert torch.equal(lazy[name], tv[name])
    assert lazy.fingerprint() == tv.fingerprint()
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="'w' has 1 NaN/inf"):
        TaskVector.load(tmp_path / "bad.safetensors", lazy=True)
