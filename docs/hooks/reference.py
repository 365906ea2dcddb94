"""MkDocs hook: the reference pages, written at build time from the code, so they cannot go stale.

- ``reference/configuration.md``: every key of :class:`pricelevel.config.Config`, walked recursively through the
  section models, with its type, its default (the value in ``conf/base.yaml``, the one place defaults are
  written), the demo's value where ``conf/quick.yaml`` changes it, and its meaning. The meaning is the field's
  ``Field(description=...)``, else the ``#:`` comment above the field in its model, else the key's comment in
  ``conf/base.yaml``.
- ``reference/cli.md``: every command of the ``pricelevel`` Typer app (walked through its click tree), with its
  usage, help, arguments and options.
- ``reference/telegram.md``: the bot's commands, from ``COMMANDS`` in ``lib/telegram/commands.py`` (read from
  the source, so the build needs no MLflow import).

The pages are added to the build as generated files; nothing is written into ``docs/``. The render functions
are plain functions of their inputs (``tests/test_docs.py`` calls them).
"""

from __future__ import annotations

import ast
import inspect
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
CONFIG_PAGE = "reference/configuration.md"
CLI_PAGE = "reference/cli.md"
TELEGRAM_PAGE = "reference/telegram.md"


# ------------------------------------------------------------------------------------------------ config keys


class Key(NamedTuple):
    """One configuration key: its dotted name, the model that declares it and the field's name there."""

    dotted: str
    model: type[BaseModel]
    field: str
    section: str


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``Model`` or ``Model | None``), if there is one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def config_keys(model: type[BaseModel], prefix: str = "", section: str = "") -> Iterator[Key]:
    """Every key of ``model``, depth first in declaration order; a field holding a model is a heading, its own
    fields the keys."""
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        inner = submodel(info.annotation)
        if inner is not None:
            yield from config_keys(inner, dotted + ".", section or name)
        else:
            yield Key(dotted, model, name, section or name)


def attribute_comments(model: type[BaseModel]) -> dict[str, str]:
    """``{field: text}`` of the ``#:`` comments written right above each field, for the model and its bases."""
    comments: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):
            continue
        pending: list[str] = []
        for line in lines[1:]:
            comment = re.match(r"^    #:\s?(.*)$", line)
            field = re.match(r"^    (\w+)\s*:", line)
            if comment:
                pending.append(comment.group(1).strip())
            elif field:
                if pending:
                    comments[field.group(1)] = " ".join(pending)
                pending = []
            else:
                pending = []
    return comments


def yaml_comments(text: str) -> dict[str, str]:
    """``{dotted key: comment}`` from a commented YAML file laid out as ``conf/base.yaml`` is: a key's comment is
    on its line, continued on the following comment-only lines that start in the same column."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last: str | None = None
    column = -1
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            last = None
            continue
        if stripped.startswith("#"):
            if last is not None and line.index("#") == column:
                comments[last] += " " + stripped.lstrip("#").strip()
            else:
                last = None
            continue
        match = re.match(r"^(\s*)([\w-]+):(.*)$", line)
        if not match:
            last = None
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([*(k for _, k in stack), key])
        stack.append((indent, key))
        hash_at = _comment_start(rest)
        if hash_at is None:
            last = None
            continue
        comments[dotted] = rest[hash_at + 1 :].strip()
        last, column = dotted, len(line) - len(rest) + hash_at
    return comments


def _comment_start(text: str) -> int | None:
    """Where the ``#`` comment starts in a YAML value (outside quotes), or ``None``."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return i
    return None


def type_text(info: Any) -> str:
    """A short, readable type: ``sample | bybit``, ``int >= 1``, ``float or null``, ``list of str``."""
    text = _annotation_text(info.annotation)
    bounds = []
    for meta in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                bounds.append(f"{sign} {value:g}" if isinstance(value, int | float) else f"{sign} {value}")
    return f"{text} {', '.join(bounds)}".strip() if bounds else text


def _annotation_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Annotated:
        return _annotation_text(args[0])
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        text = " or ".join(_annotation_text(a) for a in rest)
        return f"{text} or null" if len(rest) < len(args) else text
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_annotation_text(args[0])}"
        return f"[{', '.join(_annotation_text(a) for a in args)}]"
    if origin is dict:
        return f"map of {_annotation_text(args[0])} to {_annotation_text(args[1])}"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return {"str": "str", "int": "int", "float": "float", "bool": "bool", "Path": "path",
                "datetime": "UTC time", "Timeframe": "timeframe"}.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _value(tree: Any, dotted: str) -> tuple[bool, Any]:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def _yaml_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def prose(text: str) -> str:
    """Docstring/comment text as Markdown: reST ````code```` as `code`, the README's old section names dropped."""
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r':\w+:`~?([^`]+)`', r"`\1`", text)
    text = re.sub(r'\s*\([^()]*README "[^"]+"[^()]*\)', "", text)
    return re.sub(r'\s*README "[^"]+"', "", text).strip()


def meaning(key: Key, yaml_notes: dict[str, str], model_notes: dict[type[BaseModel], dict[str, str]]) -> str:
    """The key's meaning: its ``description=``, its ``#:`` comment, or its comment in ``conf/base.yaml``."""
    info = key.model.model_fields[key.field]
    if info.description:
        return info.description
    notes = model_notes.setdefault(key.model, attribute_comments(key.model))
    return notes.get(key.field) or yaml_notes.get(key.dotted, "")


def render_config_reference(root: Path = ROOT, keys: list[Key] | None = None) -> str:
    """The configuration reference page (Markdown): one table per section, every key once."""
    from pricelevel.config import Config, load_config

    base_text = (root / "conf" / "base.yaml").read_text()
    quick = yaml.safe_load((root / "conf" / "quick.yaml").read_text()) or {}
    defaults = load_config(root / "conf" / "base.yaml", env={}).model_dump(mode="json")
    yaml_notes = yaml_comments(base_text)
    model_notes: dict[type[BaseModel], dict[str, str]] = {}
    keys = list(config_keys(Config)) if keys is None else keys
    order = {name: i for i, name in enumerate(yaml.safe_load(base_text))}
    keys.sort(key=lambda k: order.get(k.section, len(order)))
    out = [
        "# Configuration keys",
        "",
        "Generated at build time from the pydantic config models (`lib/*/config.py`, composed by",
        "`pricelevel.config.Config`) and `conf/base.yaml`: every key, its type, its default (the value in",
        "`conf/base.yaml`), the demo's value where `conf/quick.yaml` changes it, and what it means. How the layers",
        "combine and how to set a key: [Configuration](../concepts/configuration.md).",
        "",
        "Set any key with `--set section.key=value`, `PRICELEVEL_<SECTION>__<KEY>=value` or a `--config` file;",
        "`pricelevel config show` prints every key's effective value and the layer that set it.",
        "",
    ]
    section = None
    for key in keys:
        if key.section != section:
            section = key.section
            doc = inspect.cleandoc(Config.model_fields[section].annotation.__doc__ or "") if submodel(
                Config.model_fields[section].annotation) else ""
            out += ["", f"## `{section}`", ""]
            if doc and not doc.startswith("!!!"):
                out += [prose(" ".join(doc.split("\n\n")[0].split())), ""]
            out += ["| key | type | default | demo | meaning |", "|---|---|---|---|---|"]
        info = key.model.model_fields[key.field]
        found, default = _value(defaults, key.dotted)
        in_quick, demo = _value(quick, key.dotted)
        out.append(
            f"| `{key.dotted}` | {_cell(type_text(info))} | `{_cell(_yaml_text(default)) if found else '-'}` | "
            f"{'`' + _cell(_yaml_text(demo)) + '`' if in_quick else ''} | "
            f"{_cell(prose(meaning(key, yaml_notes, model_notes)))} |"
        )
    out += ["", "Secrets are not configuration: `BYBIT_API_KEY`, `BYBIT_API_SECRET` and `TELEGRAM_BOT_TOKEN` are",
            "read from the environment only, and a config file or `--set` that names one is rejected.", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ the CLI


def command_tree(command: Any, path: tuple[str, ...], parent: Any = None) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    """``(path, command, context)`` for the command and every subcommand, depth first, in the app's order.
    Duck-typed: typer ships its own copy of click, so ``isinstance(..., click.Group)`` is not reliable."""
    context = command.context_class(command, info_name=path[-1], parent=parent)
    yield path, command, context
    if hasattr(command, "list_commands"):
        for name in command.list_commands(context):
            sub = command.get_command(context, name)
            if sub is not None and not getattr(sub, "hidden", False):
                yield from command_tree(sub, (*path, name), context)


def cli_command():
    """The ``pricelevel`` command as click sees it."""
    import typer.main

    from flows.cli import app

    return typer.main.get_command(app)


def render_cli_reference(command: Any = None) -> str:
    """The command-line reference page (Markdown): every command, its usage, help and parameters."""
    command = cli_command() if command is None else command
    out = [
        "# Command line",
        "",
        "Generated at build time from the `pricelevel` Typer app (`flows/cli.py`, `flows/commands/`): every",
        "command with its help and options, as `pricelevel COMMAND --help` prints them.",
        "",
        "`--config FILE`, `--set section.key=value` (repeatable) and `--debug` belong to every command and may",
        "stand before or after the command name. Errors are one line plus a hint; `--debug` shows the traceback.",
        "Exit codes: 0 success, 1 data or run failure, 2 bad usage or configuration.",
        "",
    ]
    for path, cmd, context in command_tree(command, ("pricelevel",)):
        name = " ".join(path)
        level = "#" * max(2, min(len(path), 3))
        out += [f"{level} `{name}`", ""]
        pieces = cmd.collect_usage_pieces(context)
        out += ["```", f"{name} {' '.join(pieces)}".rstrip(), "```", ""]
        help_text = prose(inspect.cleandoc(cmd.help or "").replace("\b\n", ""))
        if help_text:
            out += [help_text, ""]
        rows = []
        for param in cmd.params:
            if getattr(param, "hidden", False):
                continue
            if param.param_type_name == "argument":
                default = param.default
                shown = "" if default in (None, (), []) or callable(default) else f"`{_default_text(default)}`"
                rows.append((f"`{' '.join(param.get_usage_pieces(context))}`", "argument",
                             "required" if param.required else shown, getattr(param, "help", None) or ""))
                continue
            record = param.get_help_record(context)
            if record is None:
                continue
            opts = ", ".join(f"`{o}`" for o in (*param.opts, *param.secondary_opts))
            value = f"`{record[0].split(' ', 1)[1]}`" if " " in record[0] else "flag"
            default = param.default
            shown = "" if default in (None, (), []) or callable(default) else f"`{_default_text(default)}`"
            rows.append((opts, value, "required" if param.required else shown, getattr(param, "help", None) or ""))
        if rows:
            out += ["| option | value | default | meaning |", "|---|---|---|---|"]
            out += [f"| {o} | {_cell(v)} | {_cell(d)} | {_cell(prose(h))} |" for o, v, d, h in rows]
            out.append("")
        if hasattr(cmd, "list_commands"):
            out += ["Commands: " + ", ".join(f"`{name} {sub}`" for sub in cmd.list_commands(context)), ""]
    return "\n".join(out)


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(_default_text(v) for v in value)
    return str(getattr(value, "value", value))


# ------------------------------------------------------------------------------------------------ Telegram


def telegram_commands(root: Path = ROOT) -> dict[str, str]:
    """``COMMANDS`` of ``lib/telegram/commands.py``, read from its source (a literal dict)."""
    tree = ast.parse((root / "lib" / "telegram" / "commands.py").read_text())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "COMMANDS":
            return ast.literal_eval(node.value)
    raise LookupError("COMMANDS not found in lib/telegram/commands.py")


def render_telegram_reference(commands: dict[str, str] | None = None) -> str:
    commands = telegram_commands() if commands is None else commands
    out = [
        "# Telegram commands",
        "",
        "Generated at build time from `COMMANDS` in `lib/telegram/commands.py`: the list `/help` prints and the",
        "menu the bot sets in Telegram (`setMyCommands`). Set-up, who may send them, the confirmations and",
        "example answers: [Set up Telegram](../how-to/telegram.md).",
        "",
        "| command | what it answers or does |",
        "|---|---|",
    ]
    for name, what in commands.items():
        args, _, text = what.partition("] ") if what.startswith("[") else ("", "", what)
        usage = f"`/{name} {args}]`" if args else f"`/{name}`"
        out.append(f"| {_cell(usage)} | {_cell(text)} |")
    out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ MkDocs


GENERATED = {
    CONFIG_PAGE: render_config_reference,
    CLI_PAGE: render_cli_reference,
    TELEGRAM_PAGE: render_telegram_reference,
}


def on_files(files, config):  # noqa: ANN001 (MkDocs' hook signature)
    """Add the generated reference pages to the build (none of them exists in ``docs/``)."""
    from mkdocs.structure.files import File

    for path, render in GENERATED.items():
        existing = files.get_file_from_path(path)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, path, content=render()))
    return files
