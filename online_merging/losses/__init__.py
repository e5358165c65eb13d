"""Preference-loss variants that work with any optimizer: the pairwise-normalised gradient (Yuan et al.)."""

from online_merging.losses.allo import noisy_token_weights, npo_loss, token_log_ratio_weights, token_weighted_dpo_loss
from online_merging.losses.pairwise_normalized import PairwiseNormalized, pairwise_normalized_loss

__all__ = ["PairwiseNormalized", "pairwise_normalized_loss"]
__all__ += ["noisy_token_weights", "npo_loss", "token_log_ratio_weights", "token_weighted_dpo_loss"]  # ALLO
