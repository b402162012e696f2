"""The platforms an export lowers for (no JAX import: the command line checks them first)."""

from __future__ import annotations

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda")


def check_platforms(text: str) -> tuple[str, ...]:
    """``"cpu,cuda"`` -> ``("cpu", "cuda")``; ``ValueError`` naming an unknown one."""
    platforms = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ValueError(f"platforms must be a comma-separated subset of {PLATFORMS}, got {text!r}")
    return platforms
