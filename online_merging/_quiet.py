"""Library messages that a user of this package cannot act on, filtered narrowly (by logger or module, and by
message) where the package causes them."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["quiet_deepspeed_cpu_notice", "quiet_trl_training"]

DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU."


class _DropDeepSpeedCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(DEEPSPEED_CPU_NOTICE)


def quiet_deepspeed_cpu_notice() -> None:
    """Drop DeepSpeed's "Setting accelerator to CPU. If you have GPU ..." log line (printed to stdout when DeepSpeed
    is imported on a machine without a GPU). accelerate imports DeepSpeed whenever it is installed, from
    ``save_pretrained`` and from TRL's trainers, so every world build and training run printed it, DeepSpeed used or
    not. The filter sits on DeepSpeed's logger before DeepSpeed creates it (the logger keeps its filters)."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropDeepSpeedCpuNotice) for f in logger.filters):
        logger.addFilter(_DropDeepSpeedCpuNotice())


@contextlib.contextmanager
def quiet_trl_training() -> Iterator[None]:
    """Around ``trainer.train()`` of a TRL DPO/KTO trainer: TRL calls transformers' deprecated
    ``is_gradient_checkpointing`` at every step (its reference forward pass), a FutureWarning about TRL's code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                                module="transformers.modeling_utils")  # fmt: skip
        yield
