"""The documentation site: it builds strictly (no broken link, anchor or nav entry), its reference pages hold every
config key, CLI command and Telegram command (generated from the code by docs/hooks/reference.py), and the README
reaches every how-to in two clicks."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
HOOK = DOCS / "hooks" / "reference.py"


def load_hook():
    """docs/hooks/reference.py as MkDocs loads it: a file, not a package module."""
    name = "pricelevel_docs_reference_hook"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HOOK)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built as `make docs` builds it (strict: any warning fails), into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="module")
def config_markdown() -> str:
    """The configuration reference as the hook writes it (Markdown)."""
    return load_hook().render_config_reference()


def page(site: Path, name: str) -> str:
    return html.unescape((site / name / "index.html").read_text())


# ------------------------------------------------------------------------------------------------ config keys


def model_in(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    inner = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return inner[0] if inner else None


def all_config_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every dotted key of the configuration, nested models walked to their leaves."""
    for name, info in model.model_fields.items():
        inner = model_in(info.annotation)
        if inner is None:
            yield prefix + name
        else:
            yield from all_config_keys(inner, f"{prefix}{name}.")


def missing_keys(keys: list[str], text: str, code: tuple[str, str] = ("<code>", "</code>")) -> list[str]:
    """The keys that do not appear, as code, in ``text`` (HTML by default; Markdown with ``("`", "`")``)."""
    return [key for key in keys if f"{code[0]}{key}{code[1]}" not in text]


def config_key_list() -> list[str]:
    from pricelevel.config import Config

    keys = list(all_config_keys(Config))
    assert len(keys) > 150 and "validation.gaps.max_gap_bars" in keys and "backtest.protections.cooldown_bars" in keys
    return keys


def test_site_builds_strictly(site: Path) -> None:
    for name in ("index.html", "getting-started/index.html", "how-to/scale-out/index.html",
                 "reference/configuration/index.html", "reference/cli/index.html", "reference/telegram/index.html"):
        assert (site / name).is_file(), name
    # The screenshots (docs/screenshots.py) are shown where their task is; strict mode fails on a missing one.
    shots = {"prefect-deployments", "prefect-flow-run", "mlflow-models", "mlflow-compare", "backtest-report"}
    shown = set(re.findall(r'src="[./]*img/([\w-]+)\.png"', "".join(
        page(site, name) for name in ("how-to/nightly-prefect", "how-to/mlflow-promote", "how-to/backtest"))))
    assert shown == shots
    assert all((site / "img" / f"{name}.png").is_file() for name in shots)
    # The nightly deployed on the cluster, photographed on a running cluster (docs/img/cluster).
    cluster_shots = {"cluster/prefect-deployments", "cluster/prefect-flow-run", "cluster/mlflow-models"}
    assert set(re.findall(r'src="[./]*img/(cluster/[\w-]+)\.png"', page(site, "how-to/scale-out"))) == cluster_shots
    assert all((site / "img" / f"{name}.png").is_file() for name in cluster_shots)


def test_every_config_key_is_in_the_reference(site: Path) -> None:
    assert missing_keys(config_key_list(), page(site, "reference/configuration")) == []


def test_the_key_check_fails_when_a_key_is_missing(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = config_key_list()
    built = page(site, "reference/configuration")
    assert missing_keys(keys, built.replace("<code>telegram.silent</code>", "")) == ["telegram.silent"]
    # The generator itself, made to skip a key, gives a page the check refuses.
    hook = load_hook()
    walk = hook.config_keys
    monkeypatch.setattr(hook, "config_keys", lambda *a: (k for k in walk(*a) if k.dotted != "levels.filters.age.enabled"))
    assert missing_keys(keys, hook.render_config_reference(), ("`", "`")) == ["levels.filters.age.enabled"]


def test_every_config_key_has_a_meaning(config_markdown: str) -> None:
    """A new key needs a ``description=``, a ``#:`` comment in its model or a comment in conf/base.yaml."""
    rows = [line for line in config_markdown.splitlines() if line.startswith("| `")]
    assert len(rows) == len(config_key_list())
    empty = [row.split("|")[1].strip() for row in rows if not row.rstrip("| ").rsplit("|", 1)[-1].strip()]
    assert empty == []


def test_defaults_are_those_of_conf_base_yaml(config_markdown: str) -> None:
    text = config_markdown
    assert "| `data.source` | sample \\| bybit | `sample` |  |" in text
    assert "| `tuning.n_trials` | int >= 1 | `20` | `3` |" in text  # conf/quick.yaml's value in the demo column


# ------------------------------------------------------------------------------------------------ CLI, Telegram


def cli_commands() -> Iterator[tuple[tuple[str, ...], object, object]]:
    import typer.main

    from flows.cli import app

    def walk(command: object, path: tuple[str, ...], parent: object = None):
        context = command.context_class(command, info_name=path[-1], parent=parent)
        yield path, command, context
        for name in getattr(command, "list_commands", lambda _: [])(context):
            yield from walk(command.get_command(context, name), (*path, name), context)

    yield from walk(typer.main.get_command(app), ("pricelevel",))


def section(text: str, anchor: str) -> str:
    """The HTML from the heading with this id to the next heading of any level."""
    start = text.index(f'id="{anchor}"')
    following = re.search(r"<h[1-6][ >]", text[start:])
    return text[start : start + following.start()] if following else text[start:]


def test_every_cli_command_and_option_is_in_the_reference(site: Path) -> None:
    text = page(site, "reference/cli")
    commands = list(cli_commands())
    assert len(commands) > 30
    missing = []
    for path, command, _ in commands:
        name = " ".join(path)
        if f'id="{"-".join(path)}"' not in text:
            missing.append(name)
            continue
        body = section(text, "-".join(path))
        missing += [f"{name} {opt}" for param in command.params if param.param_type_name == "option"
                    for opt in param.opts if f"<code>{opt}</code>" not in body]
        if command.help:
            assert command.help.split("\n")[0][:40].replace("`", "") in re.sub(r"<[^>]+>", "", body), name
    assert missing == []


def test_every_telegram_command_is_in_the_reference(site: Path) -> None:
    # The bot's command table, read from its source (importing the module costs MLflow's import, seconds).
    source = (ROOT / "lib" / "telegram" / "commands.py").read_text()
    table = re.search(r"^COMMANDS = \{(.*?)^\}", source, re.S | re.M).group(1)
    names = re.findall(r'^    "(\w+)":', table, re.M)
    assert len(names) > 20 and "forceexit" in names
    text = page(site, "reference/telegram")
    assert [name for name in names if f"<code>/{name}" not in text] == []


# ------------------------------------------------------------------------------------------------ the README


def relative_links(text: str) -> list[str]:
    return [link for link in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in link and not link.startswith("#")]


def test_readme_is_a_front_door_two_clicks_from_every_how_to() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    links = relative_links(readme)
    broken = [link for link in links if not (ROOT / link.split("#")[0]).exists()]
    assert broken == []
    # README -> the how-to list (or a how-to itself) -> every how-to page.
    how_tos = {p.name for p in (DOCS / "how-to").glob("*.md") if p.name != "index.md"}
    first = {Path(link.split("#")[0]).name for link in links if link.startswith("docs/how-to/")}
    assert "index.md" in first
    second = {Path(link).name for link in relative_links((DOCS / "how-to" / "index.md").read_text())}
    assert how_tos - second == set()
    assert len(first & how_tos) >= 5  # the five things a user does next, one click each
