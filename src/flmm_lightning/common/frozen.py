"""Pretrained parts that never train: frozen, always in eval mode, and in no state dict."""

from __future__ import annotations

from typing import Any

from torch import nn


class FrozenParts(nn.Module):
    """Base of a module that holds pretrained submodules which never train (the LMM inside an adapter, SAM's
    image encoder inside the refiner), named in ``frozen_parts`` (dotted submodule names).

    ``freeze_parts()`` (call it once they exist) turns their gradients off; ``train()`` keeps them in eval
    mode whatever the trainer asks (no dropout, no norm statistics); they are left out of ``state_dict()`` (of
    this module and of any module that contains it: checkpoints keep only what trains), and loading a state
    dict without their keys keeps their current (pretrained) weights, also under ``strict=True``.
    """

    frozen_parts: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.register_state_dict_post_hook(_drop_frozen_parts)
        self.register_load_state_dict_pre_hook(_keep_frozen_parts)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.get_submodule(name) for name in self.frozen_parts]

    def freeze_parts(self) -> None:
        for part in self.frozen_modules():
            part.requires_grad_(False)
            part.eval()

    def train(self, mode: bool = True) -> FrozenParts:
        super().train(mode)
        for part in self.frozen_modules():
            part.eval()
        return self


def _drop_frozen_parts(
    module: FrozenParts, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    frozen = tuple(f"{prefix}{name}." for name in module.frozen_parts)
    for key in [k for k in state_dict if k.startswith(frozen)]:
        del state_dict[key]


def _keep_frozen_parts(
    module: FrozenParts,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    # Absent keys are filled with the parts' own tensors: a strict load then passes, and copying a tensor onto
    # itself is a no-op.
    for name in module.frozen_parts:
        part = module.get_submodule(name)
        for key, value in part.state_dict(prefix=f"{prefix}{name}.", keep_vars=True).items():
            state_dict.setdefault(key, value)
