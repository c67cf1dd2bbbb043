"""The one check of a prompt given as token ids, shared by the gateway and the workers. Pure."""

from __future__ import annotations

from common.errors import InvalidArgument


def validate_prompt_ids(ids: list[int], vocab_size: int) -> None:
    if not ids:
        raise InvalidArgument("prompt is empty")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidArgument(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
