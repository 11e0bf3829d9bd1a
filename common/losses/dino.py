"""The DINO self-distillation loss (Caron et al., ICCV 2021).

The student must predict, from every view, the teacher's output distribution on the *other* global
views. Two things stop the trivial solutions: centring the teacher outputs (subtracting a running
mean stops one prototype from winning) and a low teacher temperature (sharpening stops the uniform
distribution). The centre is a buffer, so it is saved and restored with the loss's ``state_dict``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher softmax and student softmax over view pairs.

    Args:
        out_dim: number of prototypes (the head's ``out_dim``).
        n_global_crops: global views; the teacher sees only these, and they come first in the
            student's output.
        student_temp: student softmax temperature.
        teacher_temp: teacher temperature after warm-up.
        warmup_teacher_temp: teacher temperature at iteration 0, raised linearly to ``teacher_temp``.
        warmup_teacher_temp_iters: length of the warm-up in iterations (0: none).
        center_momentum: EMA momentum of the centre.
    """

    def __init__(
        self,
        out_dim: int,
        n_global_crops: int = 2,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_iters: int = 0,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if out_dim < 1 or n_global_crops < 1:
            raise ValueError(f"out_dim and n_global_crops must be >= 1, got {out_dim} and {n_global_crops}.")
        if min(student_temp, teacher_temp, warmup_teacher_temp) <= 0:
            raise ValueError("temperatures must be positive.")
        if not 0 <= center_momentum < 1:
            raise ValueError(f"center_momentum must be in [0, 1), got {center_momentum}.")
        if warmup_teacher_temp_iters < 0:
            raise ValueError(f"warmup_teacher_temp_iters must be >= 0, got {warmup_teacher_temp_iters}.")
        self.n_global_crops = n_global_crops
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_iters = warmup_teacher_temp_iters
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temperature(self, iteration: int) -> float:
        """Teacher temperature at 0-based ``iteration``: linear warm-up, then constant."""
        if iteration >= self.warmup_teacher_temp_iters:
            return self.teacher_temp
        fraction = iteration / self.warmup_teacher_temp_iters
        return self.warmup_teacher_temp + fraction * (self.teacher_temp - self.warmup_teacher_temp)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, iteration: int) -> torch.Tensor:
        """Mean cross-entropy over (teacher global view, other student view) pairs; updates the centre.

        Args:
            student_out: (n_crops * B, out_dim), views stacked in order, globals first.
            teacher_out: (n_global_crops * B, out_dim), the same global views in the same order.
            iteration: 0-based training iteration, for the temperature warm-up.
        """
        if teacher_out.shape[0] % self.n_global_crops:
            raise ValueError(
                f"teacher_out has {teacher_out.shape[0]} rows, not a multiple of {self.n_global_crops} views."
            )
        batch = teacher_out.shape[0] // self.n_global_crops
        n_crops = student_out.shape[0] // batch
        min_crops = max(2, self.n_global_crops)  # at least one pair of different views
        if n_crops * batch != student_out.shape[0] or n_crops < min_crops:
            raise ValueError(
                f"student_out has {student_out.shape[0]} rows, not a whole number (>= {min_crops}) "
                f"of views of batch size {batch}."
            )
        student_log_probs = F.log_softmax(student_out / self.student_temp, dim=-1).chunk(n_crops)
        teacher_temp = self.teacher_temperature(iteration)
        teacher_probs = F.softmax((teacher_out.detach() - self.center) / teacher_temp, dim=-1)
        teacher_probs = teacher_probs.chunk(self.n_global_crops)

        total = student_out.new_zeros(())
        n_pairs = 0
        for t, q in enumerate(teacher_probs):
            for s, log_p in enumerate(student_log_probs):
                if s == t:  # same view: predicting itself teaches nothing
                    continue
                total = total + torch.sum(-q * log_p, dim=-1).mean()
                n_pairs += 1
        self.update_center(teacher_out)
        return total / n_pairs

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the teacher's batch mean, averaged over all processes under DDP."""
        batch_sum = teacher_out.detach().sum(dim=0, keepdim=True)
        count = teacher_out.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)
