"""Argument helpers shared by the ``cryptogen`` subcommands and the scripts that wrap them.

Kept free of heavy imports so ``cryptogen --help`` stays quick.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CLIError(Exception):
    """A user error (missing folder, bad value); ``cryptogen`` prints it without a traceback."""


def local_model_dir(value: str | Path) -> Path:
    """A local HF checkpoint folder, or a CLIError that says what is wrong with it."""
    path = Path(value)
    if not path.exists():
        raise CLIError(f"no model folder at {str(value)!r} (give a checkpoint folder with config.json; nothing is downloaded)")
    if not path.is_dir():
        raise CLIError(f"{str(value)!r} is a file, not a checkpoint folder")
    if not (path / "config.json").exists():
        raise CLIError(f"{str(value)!r} has no config.json: not a HuggingFace checkpoint folder")
    return path


def model_source(value: str) -> str:
    """A local checkpoint folder (checked) or something that can only be a hub id (passed on)."""
    if Path(value).exists() or not _HUB_ID.match(value) or value.startswith("."):
        return str(local_model_dir(value))
    return value


def load_pretrained(loader, source: str, **kwargs):
    """``loader.from_pretrained(source)``, with a hub miss turned into a CLIError."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise CLIError(f"could not load {source!r}: not a local folder and not loadable from the hub ({exc})") from exc


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and --client-dealer: the secure session's settings."""
    parser.add_argument("--config", default=None, help="cryptogen_hf config name or YAML path (default: configs/default.yaml)")
    parser.add_argument("--client-dealer-weights-public", dest="client_dealer", action="store_true",
                        help="the client deals the MPC triples (faster) and so sees every activation: "
                             "only for models whose weights are public; both sides must say so")


def settings_from_args(args):
    from .config import load_config

    settings = load_config(args.config)
    if args.client_dealer:
        settings.mpc.dealer = "client"
        settings.mpc.client_sees_activations = True
    return settings.validate()
