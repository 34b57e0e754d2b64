"""`--config FILE`: server flags from a YAML file, as vLLM's `vllm serve --config`.

The file is a mapping whose keys are flag names without the dashes (`max-num-seqs: 64`,
underscores also accepted); values become the flag's arguments:

    true / false   a switch: `--flag`, or `--no-flag` where that exists (false alone otherwise
                   leaves the default)
    a list         `--flag a b` for a multi-value flag, `--flag a --flag b` for a repeatable one
    a mapping      JSON text (for the JSON-valued flags)
    anything else  `--flag VALUE`

Flags given on the command line win over the file: a file entry is dropped when the command
line sets the same destination (so `--no-enable-prefix-caching` on the command line overrides
`enable-prefix-caching: true` in the file without a conflict). `pagedserve tune` writes such files.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONFIG_FLAG = "--config"


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(CONFIG_FLAG, default=None, metavar="FILE",
                        help="YAML file of server flags (keys are flag names); command-line flags win")  # fmt: skip


def split_config_flag(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the --config path or None, argv without it)."""
    path: str | None = None
    rest: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == CONFIG_FLAG:
            if i + 1 >= len(tokens):
                raise SystemExit(f"error: {CONFIG_FLAG} needs a file")
            path = tokens[i + 1]
            i += 2
            continue
        if token.startswith(CONFIG_FLAG + "="):
            path = token.split("=", 1)[1]
        else:
            rest.append(token)
        i += 1
    return path, rest


def load_config_file(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SystemExit(f"error: cannot read {CONFIG_FLAG} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"error: {CONFIG_FLAG} {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SystemExit(f"error: {CONFIG_FLAG} {path} must hold a mapping of flag names to values")
    return data


def _explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations the command line sets: its option tokens (abbreviations are off, so each is
    an exact option string, or `--flag=value`), and the positional model."""
    options = parser._option_string_actions
    dests = {options[t.split("=", 1)[0]].dest for t in argv if t.split("=", 1)[0] in options}
    if getattr(parser.parse_args(argv), "model_tag", None) is not None:  # a bad command line fails here
        dests.add("model")  # `serve MODEL` and `model:` in the file name the same thing
    return dests


def config_tokens(parser: argparse.ArgumentParser, data: dict[str, Any], skip_dests: set[str],
                  path: str = "") -> list[str]:  # fmt: skip
    options = parser._option_string_actions
    tokens: list[str] = []
    for raw_key, value in data.items():
        key = str(raw_key).lstrip("-").replace("_", "-")
        flag = "--" + key
        action = options.get(flag)
        if action is None or key == CONFIG_FLAG.lstrip("-"):
            raise SystemExit(f"error: {CONFIG_FLAG} {path}: unknown flag {raw_key!r}")
        if action.dest in skip_dests:
            continue
        tokens += _flag_tokens(flag, action, value, options)
    return tokens


def _flag_tokens(flag: str, action: argparse.Action, value: Any,
                 options: dict[str, argparse.Action]) -> list[str]:  # fmt: skip
    switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                 argparse.BooleanOptionalAction)) or (
        action.nargs == "?" and action.const is True
    )
    if isinstance(value, bool) and switch:
        if value:
            return [flag]
        negative = "--no-" + flag[2:]
        return [negative] if negative in options else []
    if isinstance(value, list):
        items = [_text(v) for v in value]
        if isinstance(action, argparse._AppendAction):
            return [t for item in items for t in (flag, item)]
        return [flag, *items]
    return [flag, _text(value)]


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def expand_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """argv with the file's flags put first (so that later, command-line flags win)."""
    path, rest = split_config_flag(argv)
    if path is None:
        return rest
    data = load_config_file(path)
    return config_tokens(parser, data, _explicit_dests(parser, rest), path) + rest
