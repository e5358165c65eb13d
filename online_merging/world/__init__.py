"""An offline, deterministic synthetic world where alignment has a measurable tax.

A ~0.5 M-parameter Llama is pre-trained from scratch on four generated skills (addition, reversal, facts,
translation), then SFT'd on "Q: ... A: ..." with a fifth of the answers in the style " sure, <answer>". Alignment
prefers that style (DPO/KTO data); reward is how often the model adopts it, ability how often it stays right.

    world = build_world(WorldConfig())      # minutes once, then loaded from the cache
    world.sft_dir, world.preference_dataset(), world.evaluate(model)
    world.lm_eval_tasks()                   # the test probes as an lm-evaluation-harness task folder
"""

from online_merging.world.build import World, build_world, default_cache_dir
from online_merging.world.config import WORLD_VERSION, WorldConfig
from online_merging.world.train import architecture_mismatch

__all__ = ["WORLD_VERSION", "World", "WorldConfig", "architecture_mismatch", "build_world", "default_cache_dir"]
