"""``--config FILE``: a YAML or JSON file of a command's options, as click's ``default_map``.

The file's keys are the command's option names (``max-steps`` or ``max_steps``), its values what the
command line would take. Click reads the ``default_map`` in place of the options' defaults, so a flag
given on the command line still wins ("Overriding Defaults" in click's documentation). Each value is
checked here, as its option checks a command-line value, so a mistake names the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from .errors import ConfigError, QAdapterError


def read_options(path: Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON (``.json``) file; an empty file is an empty mapping."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file maps option names to values, got a {type(data).__name__}")
    return data


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(f"expected a number, text or true/false, got {value!r}")


def as_command_line(value: Any, repeated: bool) -> str | list[str] | None:
    """A file's value as the command line gives it: text, so ``max-steps: 2.5`` is refused as
    ``--max-steps 2.5`` is (not truncated to 2); for a repeatable option a list of them (from one value
    or a list); None (the option's own default) for null. ValueError for what no option takes."""
    if value is None:
        return None
    if repeated:
        return [_text(item) for item in (value if isinstance(value, list) else [value])]
    if isinstance(value, list):
        raise ValueError(f"expected one value, got a list {value!r}")
    return _text(value)


def default_map(ctx: typer.Context, options: dict[str, Any], source: Path) -> dict[str, Any]:
    """The ``default_map`` of ``ctx``'s command for the file ``source``'s ``options``, each value checked
    by its option (type, range, parser) as on the command line."""
    params = {param.name: param for param in ctx.command.params if param.param_type_name == "option" and param.expose_value}
    defaults: dict[str, Any] = {}
    for key, value in options.items():
        param = params.get(str(key).lstrip("-").replace("-", "_"))
        if param is None:
            raise ConfigError(f"{source}: unknown option {key!r}: `qadapter {ctx.info_name} --help` lists the options")
        try:
            typed = as_command_line(value, param.multiple)
            if typed is not None:
                param.process_value(ctx, typed)
        except typer.BadParameter as exc:
            raise ConfigError(f"{source}: {key}: {exc.format_message()}") from None
        except (ValueError, QAdapterError) as exc:  # the value's shape, or an option's own parser (e.g. --weights)
            raise ConfigError(f"{source}: {key}: {exc}") from None
        defaults[param.name] = typed
    return defaults
