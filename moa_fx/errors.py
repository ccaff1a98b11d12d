"""Every error moa-fx raises on purpose derives from :class:`MoaFxError`.

Each message names the problem and the fix; the CLI prints it as one line.
"""

from __future__ import annotations

__all__ = [
    "MoaFxError",
    "SpecError",
    "SiteMatchError",
    "CaptureError",
    "PassError",
    "AdapterLoadError",
    "CheckpointError",
    "InputError",
    "KernelError",
    "AssetError",
    "SettingError",
    "RunLockedError",
]


class MoaFxError(Exception):
    """Base of every moa-fx error."""


class SpecError(MoaFxError, ValueError):
    """A spec field has a bad value, type or name."""


class SiteMatchError(MoaFxError):
    """A spec pattern matched nothing, or two rules claim one site."""


class CaptureError(MoaFxError):
    """torch.export could not capture the model."""


class PassError(MoaFxError):
    """A rewrite or lowering pass failed or left an invalid graph."""


class AdapterLoadError(MoaFxError):
    """Saved adapters do not fit this model or spec, or the files are damaged."""


class CheckpointError(MoaFxError):
    """A training checkpoint is missing, damaged or does not fit the run."""


class InputError(MoaFxError, ValueError):
    """Model inputs have the wrong dtype, shape or values."""


class KernelError(MoaFxError):
    """A fused op got tensors it cannot handle (shape, stride, dtype, device)."""


class AssetError(MoaFxError):
    """A real model or task could not be fetched, verified or read."""


class SettingError(MoaFxError, ValueError):
    """A training or command-line setting (steps, batch size, learning rate, ...) is out of range."""


class RunLockedError(MoaFxError):
    """Another live ``moa-fx train`` run holds the output directory's lock (a killed run's is released)."""
