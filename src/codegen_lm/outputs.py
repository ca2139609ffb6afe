"""The base of every output dataclass (model forwards, generate): fields by name, as a dict key or,
as transformers' ModelOutput allows, by position among the fields that are set."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class ModelOutput:
    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)[key]
