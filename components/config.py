"""Typed configs shared by every driver (CLI, Prefect flows, DVC stages).

Every component config derives from `StrictConfig`: unknown keys are rejected, instances
are frozen, and `config_hash` is a stable digest of the resolved values, used in cache keys
and manifests.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from components.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound="StrictConfig")


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of the resolved config (defaults included)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: `source: key.path: message (got value)`."""
    problems = []
    for item in error.errors():
        key_path = ".".join(str(part) for part in item["loc"]) or "<root>"
        got = f" (got {item['input']!r})" if item["type"] != "missing" and "input" in item else ""
        problems.append(f"{source}: {key_path}: {item['msg']}{got}")
    return "; ".join(problems)


def validate_config(model: type[ConfigT], data: Any, source: str) -> ConfigT:
    """Validate `data` against `model`, raising ConfigError that names `source` and the key path."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None


def load_yaml_config(model: type[ConfigT], path: str | Path) -> ConfigT:
    """Read a YAML file and validate it; every failure names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}".replace("\n", " ")) from None
    return validate_config(model, data or {}, str(path))
