"""Errors a user can act on. Each message names the file, key, row or field at fault."""


class CrucibleError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ConfigError(CrucibleError):
    """A config file or value is invalid (unknown key, wrong type, out of range)."""


class ArtifactError(CrucibleError):
    """An artifact is missing, incomplete (no manifest), corrupt, or clashes with another."""


class DataError(CrucibleError):
    """Input data is malformed: a bad line, a missing field, an empty corpus."""
