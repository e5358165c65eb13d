"""Preference-loss variants that work with any optimizer: the pairwise-normalised gradient (Yuan et al.)."""

from online_merging.losses.pairwise_normalized import PairwiseNormalized, pairwise_normalized_loss

__all__ = ["PairwiseNormalized", "pairwise_normalized_loss"]
