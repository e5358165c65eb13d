"""One trainer builder for recipes and the lab: the merge settings declared once (MergeSettings), reaching the
recipe's keys, the lab's runs and the optimizer; the spec each orchestrator builds its trainer from."""

import dataclasses

import pytest

from online_merging.integrations.recipe import MERGE_NAMES, RecipeArguments
from online_merging.lab.runner import UNMERGED, RunConfig
from online_merging.settings import MERGE_DEFAULTS, MergeSettings, merge_fields
from online_merging.world import WorldConfig

SETTINGS = MergeSettings(
    merge="ondare", reserve_p=0.3, alpha=0.05, alpha_unit="absolute", merge_every=2, seed=7, dare_rescale=False,
    tau_mask="every_step", tau_clamp=None, ties_sign="weighted", pull=0.01, pull_unit="absolute", pull_elements="kept",
)  # fmt: skip
"""Every merge setting off its default."""


def _fields(cls) -> dict:
    return {item.name: item.default for item in dataclasses.fields(cls)}


def test_recipe_and_lab_hold_every_merge_setting_with_their_defaults():
    recipe = _fields(RecipeArguments)
    names = [MERGE_NAMES.get(key, key) for key in MERGE_DEFAULTS if key != "merge"]
    assert {name: recipe[name] for name in names} == {
        MERGE_NAMES.get(k, k): v for k, v in MERGE_DEFAULTS.items() if k != "merge"
    }
    assert list(recipe)[list(recipe).index("optimizer") + 1 :][: len(names)] == names  # in MergeSettings' order
    assert recipe["merge"] == MERGE_DEFAULTS["merge"]
    lab = _fields(RunConfig)
    assert {key: lab[key] for key in MERGE_DEFAULTS} == {**MERGE_DEFAULTS, **UNMERGED}
    values = {k: v for k, v in dataclasses.asdict(SETTINGS).items() if k != "merge"}
    recipe_values = {MERGE_NAMES.get(k, k): v for k, v in values.items()}
    assert RecipeArguments(merge="ondare", **recipe_values).merge_settings() == SETTINGS
    assert RecipeArguments(merge="none").merge_settings().merge is None
    assert RunConfig(world=WorldConfig(), **dataclasses.asdict(SETTINGS)).merge_settings() == SETTINGS


def test_merge_fields_follow_merge_settings_after_the_named_field():
    @dataclasses.dataclass
    @merge_fields(after="first", defaults={"alpha": 0.5}, names={"seed": "mask_seed"}, omit=("pull",))
    class Holder:
        first: int = 0
        last: int = 1

    names = list(_fields(Holder))
    assert names[0] == "first" and names[-1] == "last" and "pull" not in names and "mask_seed" in names
    assert _fields(Holder)["alpha"] == 0.5 and _fields(Holder)["reserve_p"] == MERGE_DEFAULTS["reserve_p"]
    assert MergeSettings.of(Holder(mask_seed=3), {"seed": "mask_seed"}, pull=0.0).seed == 3
    with pytest.raises(TypeError, match="no field 'second'"):
        merge_fields(after="second")(type("Empty", (), {"__annotations__": {"first": "int"}}))


def test_a_bad_merge_setting_is_named_as_the_recipe_names_it():
    with pytest.raises(ValueError, match="Invalid recipe key 'merge_seed': -1"):
        RecipeArguments(merge_seed=-1)
    with pytest.raises(ValueError, match="Invalid recipe key 'tau_clamp'"):
        RecipeArguments(tau_clamp=0.0)
