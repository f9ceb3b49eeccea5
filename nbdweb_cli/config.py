"""Where the CLI finds the API's URL and token: flags, then the environment (NBDWEB_URL,
NBDWEB_TOKEN), then the config file (NBDWEB_CLI_CONFIG, default ~/.config/nbdweb/cli.toml):

    url = "http://127.0.0.1:8000"
    token = "nbdweb_..."

A config file that holds a token must be readable by its owner only (chmod 600).
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ConfigError", "Settings", "default_config_path", "resolve"]

DEFAULT_URL = "http://127.0.0.1:8000"


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Settings:
    url: str
    token: str


def default_config_path() -> Path:
    if os.environ.get("NBDWEB_CLI_CONFIG"):
        return Path(os.environ["NBDWEB_CLI_CONFIG"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "nbdweb" / "cli.toml"


def _read_file(path: Path, explicit: bool) -> dict[str, str]:
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = tomllib.load(handle)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such file") from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    unknown = set(data) - {"url", "token"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    if not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(f"{path}: url and token are strings")
    if "token" in data and stat.S_IMODE(mode) & 0o077:
        raise ConfigError(
            f"{path} holds a token but others may read it (mode {stat.S_IMODE(mode):o}): "
            f"chmod 600 {path}"
        )
    return data


def resolve(url: str | None, token: str | None, config: str | None) -> Settings:
    path = Path(config) if config else default_config_path()
    from_file = _read_file(path, explicit=config is not None)
    url = url or os.environ.get("NBDWEB_URL") or from_file.get("url") or DEFAULT_URL
    token = token or os.environ.get("NBDWEB_TOKEN") or from_file.get("token")
    if not token:
        raise ConfigError(
            'no API token: set NBDWEB_TOKEN or put token = "..." in '
            f"{path} (`manage.py create_api_token USER` makes one)"
        )
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"the URL must start with http:// or https://, not {url!r}")
    return Settings(url=url.rstrip("/"), token=token)
