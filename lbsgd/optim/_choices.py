"""Validation of string options against their valid names (shared by the optim modules)."""

from typing import Any, Sequence


def check_choice(field: str, value: Any, valid: Sequence[str]) -> None:
    """Raises ``ValueError`` naming ``field`` and the valid values if ``value`` is not one of ``valid``."""
    if value not in valid:
        choices = ", ".join(repr(v) for v in valid)
        raise ValueError(f"{field}: unknown value {value!r}; valid values are {choices}")
