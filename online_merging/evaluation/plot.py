"""The front as a picture: reward against ability, one point per checkpoint, one line per run."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_front"]


def plot_front(result: dict, path: str | Path) -> bool:
    """Draw ``result`` (:func:`online_merging.evaluation.runs.evaluate_plan`'s) to a PNG at ``path``; False, and
    nothing written, when matplotlib is not installed or the result has no front (an axis missing)."""
    front = result.get("front")
    if front is None:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from online_merging.evaluation.runs import point_value

    x_key, y_key = front["x"], front["y"]
    figure, axes = plt.subplots(figsize=(6, 4.5))
    reference = result.get("reference")
    if reference and None not in (point_value(reference, x_key), point_value(reference, y_key)):
        axes.plot(point_value(reference, x_key), point_value(reference, y_key), "k*", markersize=12, label="reference")
    for run in result["runs"]:
        xs = [point_value(point, x_key) for point in run["checkpoints"]]
        ys = [point_value(point, y_key) for point in run["checkpoints"]]
        axes.plot(xs, ys, "o-", label=run["name"])
    axes.set_xlabel(front["x_label"])
    axes.set_ylabel(front["y_label"])
    axes.set_title("reward against ability kept (up and right is better)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
