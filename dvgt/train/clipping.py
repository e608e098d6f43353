"""Per-module gradient clipping: each group of parameters gets its own max norm."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


@dataclass
class ClipGroup:
    name: str  # e.g. "aggregator" (the group's module_name substrings joined by '+')
    params: list[torch.nn.Parameter]
    max_norm: float
    norm_type: float


class GradientClipper:
    """Clips each configured group separately and returns the pre-clip norm of each group.

    Every trainable parameter must belong to exactly one group (a parameter name contains one of
    the group's module_name substrings): an uncovered parameter would train unclipped, so building
    the clipper refuses to start and lists the uncovered names.
    """

    def __init__(
        self,
        model: nn.Module,
        configs: Sequence,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
    ) -> None:
        """`process_group` (pipeline stages): the ranks holding the rest of each group's parameters;
        every group's norm is then reduced over them (`device`: where this rank's norms live)."""
        self.process_group, self.device = process_group, device
        self.groups: list[ClipGroup] = []
        owner: dict[str, str] = {}
        for config in configs:
            name = "+".join(config.module_name)
            params = []
            for pname, param in model.named_parameters():
                if param.requires_grad and any(part in pname for part in config.module_name):
                    if pname in owner:
                        raise ValueError(
                            f"optim.gradient_clip: parameter '{pname}' matches both group "
                            f"'{owner[pname]}' and group '{name}'; make module_name more specific"
                        )
                    owner[pname] = name
                    params.append(param)
            self.groups.append(ClipGroup(name, params, float(config.max_norm), float(config.norm_type)))
        uncovered = [n for n, p in model.named_parameters() if p.requires_grad and n not in owner]
        if configs and uncovered:
            shown = ", ".join(uncovered[:5]) + (f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else "")
            raise ValueError(
                f"optim.gradient_clip does not cover {len(uncovered)} trainable parameter(s): {shown}; "
                f"add their module to a group's module_name or freeze them"
            )

    def clip(self) -> dict[str, torch.Tensor]:
        """Clip every group in place; returns each group's pre-clip norm as a device tensor (not read:
        the training loop reads it with the step's other values at the logging interval)."""
        norms = {}
        for group in self.groups:
            if group.params or self.process_group is not None:  # every stage takes part in the reduction
                grads = [p.grad for p in group.params if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads, norm_type=group.norm_type)
                if isinstance(norm, DTensor):  # FSDP: the norm of this rank's gradient slices, reduced over ranks
                    norm = norm.full_tensor()
                if self.process_group is not None:
                    norm = self._reduced(norm.to(self.device, torch.float32), group.norm_type)
                torch.nn.utils.clip_grads_with_norm_(group.params, group.max_norm, norm)
                norms[group.name] = norm.detach()
        return norms

    def _reduced(self, norm: torch.Tensor, norm_type: float) -> torch.Tensor:
        """The norm over the parameters of every rank of the process group, from this rank's part."""
        if norm_type == float("inf"):
            dist.all_reduce(norm, op=dist.ReduceOp.MAX, group=self.process_group)
            return norm
        power = norm**norm_type
        dist.all_reduce(power, group=self.process_group)
        return power ** (1.0 / norm_type)
