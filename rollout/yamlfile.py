"""Reading the YAML files users write (scenarios, deploy files) into validated models."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from rollout.errors import InputError, describe_validation_error

M = TypeVar("M", bound=BaseModel)


def load_yaml_model(path: Path | str, model: type[M], what: str) -> M:
    """Parse `path` as a YAML mapping and validate it; every problem is one InputError line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such {what}: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a {what} must be a YAML mapping")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise InputError(f"{path}: {describe_validation_error(e)}") from None
