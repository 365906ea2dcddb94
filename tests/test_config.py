from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pricelevel.config import Config, load_config
from pricelevel.core.config import ConfigError
from pricelevel.core.timeframes import Timeframe

BASE = Path(__file__).resolve().parents[1] / "conf" / "base.yaml"


def test_base_config_loads_with_the_bundled_defaults() -> None:
    config = load_config(BASE)
    assert config.data.source == "sample"
    assert len(config.data.symbols) == 10 and "BTCUSDT" in config.data.symbols
    assert config.data.timeframes == (Timeframe.D1, Timeframe.H4, Timeframe.H1)
    assert config.bybit.category == "spot" and config.bybit.page_limit == 1000


def test_precedence_base_then_file_then_env_then_set(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("data:\n  root: /from/file\n  source: bybit\nbybit:\n  timeout_s: 3\n")
    env = {"PRICELEVEL_DATA__ROOT": "/from/env", "PRICELEVEL_BYBIT__ENDPOINT": "http://127.0.0.1:9/"}
    config = load_config(BASE, overlay, ["data.root=/from/set"], env)
    assert str(config.data.root) == "/from/set"          # --set beats env
    assert config.bybit.endpoint == "http://127.0.0.1:9"  # env beats base; trailing slash normalised
    assert config.data.source == "bybit"                  # file beats base
    assert config.bybit.timeout_s == 3.0
    assert str(load_config(BASE, overlay, [], env).data.root) == "/from/env"  # env beats file
    assert str(load_config(BASE, overlay).data.root) == "/from/file"


def test_text_values_are_parsed_as_yaml() -> None:
    config = load_config(BASE, overrides=["data.symbols=[BTCUSDT, ETHUSDT]", "bybit.testnet=true", "data.end=null"])
    assert config.data.symbols == ("BTCUSDT", "ETHUSDT") and config.bybit.testnet and config.data.end is None


def test_unrelated_environment_is_ignored() -> None:
    config = load_config(BASE, env={"PRICELEVEL_HOME": "/x", "PATH": "/bin", "PRICELEVELX__A": "1"})
    assert config == load_config(BASE)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("data.source=ftp", "data.source: Input should be 'sample' or 'bybit'"),
        ("data.timeframes=[2h]", "data.timeframes.0"),
        ("data.symbols=[]", "data.symbols"),
        ("data.symbols=[BTCUSDT,BTCUSDT]", "duplicates"),
        ("data.nope=1", "data.nope: unknown key"),
        ("bybit.page_limit=5000", "bybit.page_limit: Input should be less than or equal to 1000"),
        ("bybit.endpoint=ftp://x", "bybit.endpoint: must be an http(s) URL"),
        ("validation.gaps.max_missing_fraction=2", "validation.gaps.max_missing_fraction"),
        ("data.end=2020-01-01", "must be after start"),
    ],
)
def test_bad_values_fail_with_one_line_naming_key_and_layer(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(BASE, overrides=[override])
    message = str(info.value)
    assert needle in message and "\n" not in message
    if "must be after" not in message:
        assert "[from --set" in message


def test_env_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"\[from PRICELEVEL_DATA__SOURCE\]"):
        load_config(BASE, env={"PRICELEVEL_DATA__SOURCE": "nowhere"})


def test_bad_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(BASE, tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(BASE, broken)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(BASE, overrides=["data.root"])


@pytest.mark.parametrize("key", ["bybit.api_key", "bybit.api_secret", "telegram.bot_token"])
def test_secrets_are_refused_in_config(key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only from the environment"):
        load_config(BASE, overrides=[f"{key}=hunter2hunter2"])
    section, name = key.split(".")
    overlay = tmp_path / "o.yaml"
    overlay.write_text(f"{section}:\n  {name}: hunter2hunter2\n")
    with pytest.raises(ConfigError) as info:
        load_config(BASE, overlay)
    assert "hunter2hunter2" not in str(info.value)


def test_config_is_frozen() -> None:
    config = load_config(BASE)
    with pytest.raises(ValidationError):
        config.data.source = "bybit"  # type: ignore[misc]


def test_with_root_resolves_relative_paths(tmp_path: Path) -> None:
    config = load_config(BASE).with_root(tmp_path)
    assert config.data.root == tmp_path / "data" and config.data.sample_dir == tmp_path / "data" / "sample"
    assert isinstance(config, Config)


def test_flat_view_for_parameter_logging() -> None:
    flat = load_config(BASE).flat()
    assert flat["data.source"] == "sample" and flat["validation.gaps.max_gap_bars"] == 24


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_defaults_live_once_base_yaml_and_the_models_agree() -> None:
    """Every key of the config models is written in conf/base.yaml, and where a model has a default of its
    own it is the same value: reading the YAML or constructing the section in code gives one configuration."""
    import yaml

    from pricelevel.config import Config

    written = dict(_leaves(yaml.safe_load(BASE.read_text())))
    from_yaml = load_config(BASE)
    assert set(written) == set(from_yaml.flat()), "a key is in the models but not in base.yaml, or the reverse"
    required = {"data": {k: getattr(from_yaml.data, k) for k in ("symbols", "timeframes", "start", "end")}}
    assert Config.model_validate(required) == from_yaml  # the models' own defaults are base.yaml's values


def test_explain_config_names_the_layer_of_every_key(project: Path, tmp_path: Path) -> None:
    from pricelevel.config import explain_config

    overlay = tmp_path / "mine.yaml"
    overlay.write_text("model:\n  hidden_size: 16\n")
    env = {"PRICELEVEL_HOME": str(project), "PRICELEVEL_BYBIT__TIMEOUT_S": "3"}
    layers = {s.key: (s.value, s.layer) for s in explain_config(overlay, ["tuning.n_trials=5"], env)}
    assert layers["model.hidden_size"] == (16, str(overlay))
    assert layers["bybit.timeout_s"] == (3.0, "PRICELEVEL_BYBIT__TIMEOUT_S")
    assert layers["tuning.n_trials"] == (5, "--set tuning.n_trials")
    assert layers["levels.window"] == (12, "base")


def test_config_show_prints_each_key_with_its_layer_and_flags_the_environment(cli, project: Path, monkeypatch) -> None:
    import json

    monkeypatch.setenv("PRICELEVEL_DATA__SOURCE", "bybit")
    code, out, _ = cli("config", "show", "--json", "--set", "model.seed=7")
    rows = {row["key"]: row for row in json.loads(out)}
    assert code == 0 and rows["data.source"] == {"key": "data.source", "value": "bybit", "layer": "PRICELEVEL_DATA__SOURCE"}
    assert rows["model.seed"]["layer"] == "--set model.seed" and rows["model.seed"]["value"] == 7
    code, out, _ = cli("config", "show")
    assert code == 0 and "set by environment variables" in out and "PRICELEVEL_DATA__SOURCE" in out


def test_global_options_work_before_or_after_the_command(cli, project: Path) -> None:
    from flows.cli import hoist_global_options

    assert hoist_global_options(["train", "--set", "a=1", "--quick", "--debug", "--config=x.yaml"]) == [
        "--set", "a=1", "--debug", "--config=x.yaml", "train", "--quick"]
    assert hoist_global_options(["validate", "--", "--set"]) == ["validate", "--", "--set"]
    for argv in (("--set", "data.source=ftp", "data", "status"), ("data", "status", "--set", "data.source=ftp")):
        code, _, err = cli(*argv)
        assert code == 2 and "data.source" in err
    from pricelevel.core.config import ConfigError

    with pytest.raises(ConfigError):  # --debug before the command: the traceback, not one line
        cli("--debug", "data", "status", "--set", "data.source=ftp")
