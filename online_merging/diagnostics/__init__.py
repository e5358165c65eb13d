"""Training diagnostics: gradient entanglement of margin-based preference losses."""

from online_merging.diagnostics.callback import GradientEntanglementCallback
from online_merging.diagnostics.entanglement import EntanglementReport, gradient_entanglement, response_log_probs

__all__ = ["EntanglementReport", "GradientEntanglementCallback", "gradient_entanglement", "response_log_probs"]
