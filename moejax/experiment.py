"""Helpers for experiments/*.py: the base ConfigDict every experiment starts from.

Every field is documented where its dataclass is declared (moejax/config.py); the ConfigDict
holds all of them so that any `--config.section.field=value` override works.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from moejax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def base_config() -> ml_collections.ConfigDict:
    sections = {"model": ModelConfig(), "data": DataConfig(), "optim": OptimConfig(), "train": TrainConfig(),
                "mesh": MeshConfig()}
    cd = ml_collections.ConfigDict()
    for name, dc in sections.items():
        values = dataclasses.asdict(dc)
        if name == "model":
            values["mlp_only_layers"] = tuple(values["mlp_only_layers"])
        cd[name] = ml_collections.ConfigDict(values)
    return cd


def _load_module(path: str, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Runs an experiments/*.py file's get_config() (for tests and tools without absl flags)."""
    return _load_module(path, os.path.splitext(os.path.basename(path))[0]).get_config()


def resolve(cd: ml_collections.ConfigDict) -> Config:
    return Config.from_dict(cd)


def sibling(file: str, name: str):
    """Imports experiments/<name>.py next to `file` (presets build on each other this way)."""
    return _load_module(os.path.join(os.path.dirname(os.path.abspath(file)), name + ".py"), f"moejax_experiment_{name}")
