"""Resolve the --hardware argument (a preset, `local`, or a .json/.yaml file) to a HardwareSpec."""

from __future__ import annotations

import json
from pathlib import Path

from roofline.errors import ConfigError
from roofline.planner.hardware import HardwareSpec, get_preset_hardware, hardware_from_mapping
from roofline.planner.profile import load_profile

SPEC_SUFFIXES = (".json", ".yaml", ".yml")


def load_hardware(name: str, profile_path: Path | None = None) -> HardwareSpec:
    """A preset name, `local` (the calibrated profile) or a JSON/YAML spec file, as a HardwareSpec."""
    if name == "local":
        return load_profile(profile_path).to_hardware()
    path = Path(name)
    if path.suffix.lower() in SPEC_SUFFIXES:
        return hardware_from_file(path)
    return get_preset_hardware(name)


def hardware_from_file(path: Path) -> HardwareSpec:
    """Read a HardwareSpec from a JSON or YAML file (YAML needs pyyaml)."""
    if not path.is_file():
        raise ConfigError(f"hardware file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"hardware file {path}: invalid JSON ({error})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"hardware file {path}: reading YAML needs pyyaml "
                              "(`pip install pyyaml`), or use a .json file") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"hardware file {path}: invalid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"hardware file {path}: expected a mapping of field names to values")
    raw.setdefault("name", path.stem)
    return hardware_from_mapping(raw, str(path))
