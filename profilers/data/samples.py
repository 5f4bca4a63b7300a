"""One calibration / evaluation sample as every stage sees it: token ids plus the tokens that carry the loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Sample:
    """``input_ids`` [N] (template and BOS included); ``loss_mask`` [N] bool marks the *target* tokens
    (e.g. the answer): token t is scored as predicted from tokens < t, so loss_mask[0] is always False.
    ``answer`` is the expected answer text where the sample has one; ``meta`` says how it was made."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    answer: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.input_ids.ndim != 1 or self.loss_mask.shape != self.input_ids.shape:
            raise ValueError("Sample needs 1-D input_ids and a loss_mask of the same shape")

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    def labels(self) -> torch.Tensor:
        """HF-style labels: the token id where the loss applies, -100 elsewhere."""
        return torch.where(self.loss_mask, self.input_ids, torch.full_like(self.input_ids, -100))
