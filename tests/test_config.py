"""``server.config``: the shipped ``config.toml`` is the defaults, ``JOBFEED_SECTION__KEY``
overrides any key, and every wrong setting is a ``ConfigError`` of one line.

The last tests run ``python -m server serve`` as a child process on a storage path it cannot
create or write, which must end with exit status 2 and one line on stderr.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from server.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config.toml"
CLI_TIMEOUT = 30.0

# The keys protocol v1 ("Configuration keys operators rely on") promises by name.
SPEC_KEYS = {
    "server": {"host", "port", "shutdown_timeout"},
    "storage": {"path", "durability"},
    "stream": {"heartbeat_seconds", "max_client_frame_bytes"},
    "limits": {"max_event_bytes", "max_body_bytes", "page_size_max"},
    "log": {"format", "level"},
}


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None, environ: dict[str, str]) -> str:
    """The ConfigError's message, checked to be a single line."""
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ)
    message = str(caught.value)
    assert message
    assert "\n" not in message, message
    return message


def model_keys() -> dict[str, set[str]]:
    """Each section's keys, as the models define them."""
    return {name: set(type(section).model_fields) for name, section in Config()}


def test_shipped_config_toml_holds_the_defaults() -> None:
    """Loading the shipped config.toml gives exactly the models' defaults (its storage.path
    resolved next to the file)."""
    loaded = load_config(SHIPPED, environ={})
    defaults = Config().model_dump()
    defaults["storage"]["path"] = REPO / "data" / "jobfeed.db"
    assert loaded.model_dump() == defaults


def test_shipped_config_toml_names_every_key_of_the_models() -> None:
    """config.toml has the same sections and keys as the models: none unknown, none missing."""
    shipped = tomllib.loads(SHIPPED.read_text(encoding="utf-8"))
    assert {section: set(keys) for section, keys in shipped.items()} == model_keys()


def test_keys_named_by_the_protocol_exist() -> None:
    """Every configuration key the protocol promises operators exists under its name."""
    keys = model_keys()
    for section, names in SPEC_KEYS.items():
        assert names <= keys[section], section


def test_env_overrides_a_default() -> None:
    """JOBFEED_SERVER__PORT=9000 sets server.port to the integer 9000."""
    config = load_config(None, environ={"JOBFEED_SERVER__PORT": "9000"})
    assert config.server.port == 9000


def test_env_overrides_the_file(tmp_path: Path) -> None:
    """An environment variable wins over the same key in the config file."""
    path = write_toml(tmp_path, "[server]\nport = 1234\nshutdown_timeout = 4.5\n")
    config = load_config(path, environ={"JOBFEED_SERVER__PORT": "9000"})
    assert config.server.port == 9000
    assert config.server.shutdown_timeout == 4.5


def test_unknown_key_in_toml_is_named_in_one_line(tmp_path: Path) -> None:
    """An unknown key in the file is a ConfigError whose one line names section and key."""
    path = write_toml(tmp_path, "[server]\nport = 8080\nprot = 9000\n")
    assert "server.prot" in config_error(path, {})


def test_unknown_section_in_toml_is_refused(tmp_path: Path) -> None:
    """An unknown section in the file is a ConfigError naming it."""
    path = write_toml(tmp_path, "[sever]\nport = 8080\n")
    assert "sever" in config_error(path, {})


def test_bad_type_is_refused_naming_the_key(tmp_path: Path) -> None:
    """A value of the wrong type is a ConfigError whose one line names the key."""
    path = write_toml(tmp_path, '[server]\nport = "eighty"\n')
    assert "server.port" in config_error(path, {})


def test_bad_env_value_is_refused_naming_the_key() -> None:
    """An environment override that is not of the key's type is a ConfigError naming it."""
    message = config_error(None, {"JOBFEED_STORAGE__DURABILITY": "sometimes"})
    assert "storage.durability" in message


def test_unknown_env_section_is_refused() -> None:
    """JOBFEED_<SECTION>__<KEY> with an unknown section is a ConfigError naming the variable."""
    assert "JOBFEED_SERVRE__PORT" in config_error(None, {"JOBFEED_SERVRE__PORT": "9000"})


def test_unknown_env_key_is_refused() -> None:
    """JOBFEED_<SECTION>__<KEY> with an unknown key in a known section is a ConfigError."""
    assert "server.prot" in config_error(None, {"JOBFEED_SERVER__PROT": "9000"})


def test_invalid_toml_is_refused_in_one_line(tmp_path: Path) -> None:
    """A file that is not TOML is a ConfigError of one line naming the file."""
    path = write_toml(tmp_path, "[server\nport = 1\n")
    assert str(path) in config_error(path, {})


def test_relative_storage_path_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative storage.path resolves against the config file's directory, not the
    working directory."""
    etc = tmp_path / "etc"
    etc.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write_toml(etc, '[storage]\npath = "data/jobs.db"\n')
    assert load_config(path, environ={}).storage.path == etc / "data" / "jobs.db"


def test_absolute_storage_path_is_kept(tmp_path: Path) -> None:
    """An absolute storage.path is used as given."""
    target = tmp_path / "db" / "abs.db"
    path = write_toml(tmp_path, f'[storage]\npath = "{target}"\n')
    assert load_config(path, environ={}).storage.path == target


def unwritable_under_a_file(tmp_path: Path) -> Path:
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file, so nothing can be created under it\n")
    return blocker / "data" / "jobfeed.db"


def unwritable_read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes into a 0o500 directory; the under_a_file case covers root")
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return directory / "jobfeed.db"


@pytest.mark.parametrize(
    "unwritable",
    [unwritable_under_a_file, unwritable_read_only_dir],
    ids=["under_a_file", "read_only_dir"],
)
def test_serve_with_unwritable_storage_exits_2_with_one_line(
    tmp_path: Path, unwritable: Callable[[Path], Path]
) -> None:
    """``jobfeed serve`` whose storage directory cannot be created or written exits with
    status 2 and exactly one line on stderr, naming storage.path."""
    db_path = unwritable(tmp_path)
    config = write_toml(tmp_path, f'[storage]\npath = "{db_path}"\n[server]\nport = 0\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFEED_")}
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "storage.path" in lines[0]
