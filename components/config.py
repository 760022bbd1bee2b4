"""Typed configs shared by every driver (CLI, Prefect flows, DVC stages).

Every component config derives from `StrictConfig`: unknown keys are rejected, instances
are frozen, and `config_hash` is a stable digest of the resolved values, used in cache keys
and manifests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from components.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound="StrictConfig")


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields added after artifacts were published under this config: left out of the hash while
    # they hold their default, so those artifacts keep their cache keys (and stay reusable).
    hash_omits_at_default: ClassVar[tuple[str, ...]] = ()

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of the resolved config (defaults included, except a
        `hash_omits_at_default` field at its default, at any depth)."""
        canonical = json.dumps(_hashed_values(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def code_references(self) -> list[str]:
        """User code (`module:function`) this config names itself; a config naming a function
        the component imports overrides it (a reward spec). Nested configs are walked by
        `code_fingerprints`."""
        return []

    def code_fingerprints(self) -> dict[str, str]:
        """{"module:function": "sha256:<module file bytes>"} for every user function this config
        (at any depth) names: user code is not covered by the component's version, so its
        source joins the cache key (`artifacts.cache_key`) and an edited function reruns."""
        return {name: source_fingerprint(name) for name in sorted(set(_references(self)))}


def _hashed_values(config: StrictConfig) -> dict[str, Any]:
    """`model_dump(mode="json")` (its serialisation untouched), less each nested config's
    `hash_omits_at_default` fields that hold their default."""
    return _omit_defaults(config, config.model_dump(mode="json"))


def _omit_defaults(value: Any, dumped: Any) -> Any:
    if isinstance(value, StrictConfig) and isinstance(dumped, dict):
        fields = type(value).model_fields
        for name in value.hash_omits_at_default:
            if getattr(value, name) == fields[name].get_default(call_default_factory=True):
                dumped.pop(name, None)
        for name in fields:
            if name in dumped:
                dumped[name] = _omit_defaults(getattr(value, name), dumped[name])
    elif isinstance(value, (list, tuple)) and isinstance(dumped, list) and len(value) == len(dumped):
        return [_omit_defaults(item, out) for item, out in zip(value, dumped)]
    elif isinstance(value, dict) and isinstance(dumped, dict):
        return {key: _omit_defaults(value[key], out) if key in value else out for key, out in dumped.items()}
    return dumped


def _references(value: Any) -> list[str]:
    """Every `code_references()` of `value` and of the configs inside it (fields, lists, dicts)."""
    if isinstance(value, StrictConfig):
        found = list(value.code_references())
        for name in type(value).model_fields:
            found += _references(getattr(value, name))
        return found
    if isinstance(value, (list, tuple)):
        return [name for item in value for name in _references(item)]
    if isinstance(value, dict):
        return [name for item in value.values() for name in _references(item)]
    return []


def source_fingerprint(reference: str) -> str:
    """sha256 of the source file of `module:function`'s module, found without running it; a
    module that cannot be found (or has no source file) is a ConfigError naming the function."""
    module_name = reference.split(":", 1)[0]
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as error:
        raise ConfigError(f"function {reference!r}: cannot find module {module_name!r} ({error})") from None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise ConfigError(f"function {reference!r}: module {module_name!r} not found (or has no source file) "
                          "on the Python path")
    return "sha256:" + hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()


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
