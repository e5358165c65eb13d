"""How well the cheaper importances agree with ALLO's probe on the quick world's SFT model.

``python -m online_merging.neurons.compare [--steps 20] [--lr 3e-5] [--batch-size 32] [--k 0.1]`` runs one DPO
probe on the world's preference pairs and prints, for "updates" (Σ_t |θ_t − θ_{t−1}|) and "gradients" (Σ_t |g_t|)
against "probe" (|θ_T − θ_0| / lr): the Spearman correlation over all ranked neurons (input embedding excluded, as
``locate_key_neurons``' default does), its mean within parameters, and the overlap of the top-k sets (global and per
layer)."""

from __future__ import annotations

import argparse
import json

import torch


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.double().numpy(), b.double().numpy()).statistic)


def _overlap(a: dict, b: dict) -> float:
    """|A ∩ B| / |A| over all rows."""
    both = sum(int((a[n] & b[n]).sum()) for n in a)
    return both / max(1, sum(int(a[n].sum()) for n in a))


def compare(steps: int = 20, lr: float = 3e-5, batch_size: int = 32, k: float = 0.1, seed: int = 0) -> dict:
    from transformers import AutoModelForCausalLM

    from online_merging.neurons.locate import embedding_names, probe_importances
    from online_merging.neurons.masks import key_neuron_masks
    from online_merging.world import WorldConfig, build_world

    world = build_world(WorldConfig.quick(), progress=False)
    model = AutoModelForCausalLM.from_pretrained(world.sft_dir, dtype=torch.float32)
    found = probe_importances(
        model, world.preference_dataset(), world.tokenizer(), methods=("probe", "updates", "gradients"), steps=steps,
        learning_rate=lr, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    skip = set(embedding_names(model))
    found = {m: {n: v for n, v in imp.items() if n not in skip} for m, imp in found.items()}
    names = sorted(found["probe"])
    flat = {m: torch.cat([imp[n] for n in names]) for m, imp in found.items()}
    result = {"steps": steps, "lr": lr, "batch_size": batch_size, "k": k, "neurons": int(flat["probe"].numel())}
    for method in ("updates", "gradients"):
        result[method] = {
            "spearman_global": round(_spearman(flat["probe"], flat[method]), 4),
            "spearman_within_parameter_mean": round(
                sum(_spearman(found["probe"][n], found[method][n]) for n in names) / len(names), 4
            ),
            **{
                f"top_k_overlap_{scope}": round(
                    _overlap(key_neuron_masks(found["probe"], k, scope), key_neuron_masks(found[method], k, scope)), 4
                )
                for scope in ("global", "layer")
            },
        }
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps(compare(args.steps, args.lr, args.batch_size, args.k, args.seed), indent=2))


if __name__ == "__main__":
    main()
