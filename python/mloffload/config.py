"""Server settings: one declarative table drives the CLI, the environment and the TOML file.

Precedence is CLI > environment (``ML_OFFLOAD_*``) > TOML file > defaults. Every option is
listed once in ``OPTIONS``; ``--help``, the README table and the NixOS module test all read it.

It is long because that table is the one place every setting is declared (default, type,
flag, variable, help); splitting it would spread one list over several files.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

ENV_PREFIX = "ML_OFFLOAD_"


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message says which and why."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ml-offload"


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str | int) -> int:
    """Parse ``512MiB``, ``8G``, ``1.5GB`` or a plain byte count (binary units throughout)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise ConfigError(f"not a size: {text!r} (use e.g. 512MiB, 8GiB or a byte count)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | float | int) -> float:
    """Parse ``5m``, ``1h30m``, ``90s``, ``-1`` or a number of seconds. Negative means never.

    Only finite values: ``nan`` or ``inf`` would reach ``loop.call_later`` and break the
    timers that unload models and end requests."""
    seconds = _duration(text)
    if not math.isfinite(seconds):
        raise ConfigError(f"not a duration: {text!r} (a finite number of seconds, or e.g. "
                          "30s, 5m, 1h)")
    return seconds


def _duration(text: str | float | int) -> float:
    if isinstance(text, int | float):
        return float(text)
    s = str(text).strip()
    try:
        return float(s)
    except ValueError:
        pass
    sign = -1.0 if s.startswith("-") else 1.0
    body = s.lstrip("+-")
    parts = re.findall(r"([0-9]*\.?[0-9]+)(ms|s|m|h|d)", body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise ConfigError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h or seconds)")
    return sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"not a boolean: {text!r} (use true or false)")


def parse_gpu_layers(text: str | int) -> int | None:
    """``auto`` (None) lets the planner decide; ``-1`` means all layers; N means N."""
    if isinstance(text, int):
        return text
    if str(text).strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise ConfigError(f"n_gpu_layers must be 'auto' or an integer, not {text!r}") from exc


def parse_list(text: str | Sequence[str]) -> list[str]:
    """A list from TOML, or from a comma-separated string in the environment."""
    if isinstance(text, str):
        return [p.strip() for p in text.split(",") if p.strip()]
    return [str(p) for p in text]


def parse_paths(text: str | Sequence[str]) -> list[str]:
    """Folders: a TOML list, or a string separated by commas or colons (like $PATH)."""
    if isinstance(text, str):
        return [p.strip() for p in re.split(r"[,:]", text) if p.strip()]
    return [str(p) for p in text]


@dataclasses.dataclass(frozen=True)
class UpstreamModelName:
    """A model an upstream serves: its own id there, and other names it answers to here."""

    id: str
    aliases: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class UpstreamConfig:
    """One remote OpenAI-compatible server (``[[upstreams]]``, ``--upstream``).

    ``url`` never carries credentials: a key written in the URL (``http://KEY@host``) or read
    from ``api_key_file`` is kept in ``api_key`` (left out of the repr), and ``key_source``
    says where it came from, for the error that tells a user to fix it.
    """

    url: str
    models: tuple[UpstreamModelName, ...] = ()  # empty: whatever its /v1/models lists
    api_key: str = dataclasses.field(default="", repr=False)
    key_source: str = ""
    max_in_flight: int | None = None  # None: its slots when it reports them, else no limit


_UPSTREAM_KEYS = {"url", "models", "api_key_file", "max_in_flight"}


def _upstream_url(text: str) -> tuple[str, str]:
    """``(url without credentials, the key written in it)``; the key is the password of the
    userinfo, or its user name when there is no password (``http://KEY@host:8000``)."""
    parts = urlsplit(str(text).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"an upstream needs an http:// or https:// URL with a host, not "
                          f"{_redact(str(text))!r}")
    key = unquote(parts.password or parts.username or "")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):  # OpenAI clients' base URL: the upstream is the server
        path = path[:-3]
    return urlunsplit((parts.scheme, netloc, path, "", "")), key


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//…@", url)


def _upstream_models(value: Any, where: str) -> tuple[UpstreamModelName, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: models must be a list of ids or {{id, aliases}} tables")
    out = []
    for item in value:
        if isinstance(item, str) and item:
            out.append(UpstreamModelName(item))
        elif isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"] and \
                set(item) <= {"id", "aliases"} and \
                all(isinstance(a, str) and a for a in item.get("aliases", [])):
            out.append(UpstreamModelName(item["id"], tuple(item.get("aliases", []))))
        else:
            raise ConfigError(f"{where}: a model is an id or {{id = \"...\", aliases = "
                              f"[\"...\"]}}, not {item!r}")
    return tuple(out)


def _upstream(item: Any) -> UpstreamConfig:
    if isinstance(item, str):
        url, key = _upstream_url(item)
        return UpstreamConfig(url, api_key=key, key_source="the key in its URL" if key else "")
    if not isinstance(item, dict):
        raise ConfigError(f"an upstream is a URL or a table with url, models, api_key_file, "
                          f"max_in_flight; not {item!r}")
    unknown = set(item) - _UPSTREAM_KEYS
    if unknown or not isinstance(item.get("url"), str):
        raise ConfigError(f"an upstream table needs url (a string) and may have "
                          f"{', '.join(sorted(_UPSTREAM_KEYS - {'url'}))}; got "
                          f"{', '.join(sorted(item))}")
    url, key = _upstream_url(item["url"])
    where = f"upstream {url}"
    source = "the key in its URL" if key else ""
    if "api_key_file" in item:
        key_file = _path(item["api_key_file"])
        try:
            key = key_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read api_key_file {key_file}: {exc}") from None
        source = f"the key in api_key_file {key_file} of its [[upstreams]] entry"
    limit = item.get("max_in_flight")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"{where}: max_in_flight must be a positive integer, not {limit!r}")
    models = _upstream_models(item["models"], where) if "models" in item else ()
    return UpstreamConfig(url, models, key, source, limit)


def parse_upstreams(value: str | Sequence[Any]) -> tuple[UpstreamConfig, ...]:
    """Upstreams from the environment (comma-separated URLs), the repeated ``--upstream``
    flag (a list of URLs) or TOML (a list of URLs or ``[[upstreams]]`` tables)."""
    items = parse_list(value) if isinstance(value, str) else list(value)
    upstreams = tuple(_upstream(item) for item in items)
    urls = [u.url for u in upstreams]
    if len(set(urls)) != len(urls):
        twice = sorted({u for u in urls if urls.count(u) > 1})
        raise ConfigError(f"upstream {', '.join(twice)} is listed more than once")
    return upstreams


def parse_int(text: str | int) -> int:
    try:
        return int(text)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"not an integer: {text!r}") from exc


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(text: Any) -> str:
        value = str(text).strip()
        if value not in choices:
            raise ConfigError(f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    return parse


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    metavar: str = "VALUE"
    flag_only: bool = False  # a CLI switch with no environment variable (e.g. --config)
    shown_default: str | None = None  # what --help says when the default is computed
    repeat: str | None = None  # a repeatable flag (--upstream URL --upstream URL) of this name

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + (self.repeat or self.name).replace("_", "-")


T = TypeVar("T")


def setting(default: T, parse: Callable[[Any], Any], help: str, metavar: str = "VALUE",
            shown: str | None = None, factory: Callable[[], T] | None = None,
            repeat: str | None = None) -> T:
    """One setting, declared once: its ``Settings`` field and its row in ``OPTIONS``.
    ``repeat``: the flag is given once per value, under this name (the list's parser then
    gets a list of the values)."""
    meta = {"parse": parse, "help": help, "metavar": metavar, "shown": shown, "repeat": repeat}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)  # type: ignore[no-any-return]
    return dataclasses.field(default=default, metadata=meta)  # type: ignore[no-any-return]


def _path(v: Any) -> Path:
    return Path(v).expanduser()


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every server setting. Each field is a CLI flag, an ``ML_OFFLOAD_*`` variable and a TOML
    key (see ``OPTIONS``, derived from these fields)."""

    host: str = setting("127.0.0.1", str, "address to bind; loopback unless you set an API key",
                        "ADDR")
    port: int = setting(9000, parse_int, "TCP port of the API", "PORT")
    ollama_port: int = setting(
        0, parse_int, "also serve the same API on this port, e.g. 11434 (Ollama's) for "
        "clients that cannot be pointed elsewhere (0: off)", "PORT")
    data_dir: Path = setting(
        Path(), _path, "where the registry database and the embedded default model live",
        "DIR", shown="$XDG_DATA_HOME/ml-offload", factory=default_data_dir)
    models_dir: tuple[Path, ...] = setting(
        (), parse_paths, "one or more folders scanned for .gguf files (comma or colon "
        "separated)", "DIRS")
    default_model: str = setting(
        "", str, "registry id, alias or .gguf path answered for model 'default' (default: the "
        "embedded Gemma 3 270M)", "MODEL")
    fim_model: str = setting(
        "", str, "registry id or alias that /infill and FIM completions (a suffix on "
        "/v1/completions) use when the request names no model (default: the default model, "
        "if it has FIM tokens)", "MODEL")
    n_ctx: int = setting(4096, parse_int, "context length per loaded model, in tokens", "N")
    default_max_tokens: int = setting(
        512, parse_int, "tokens generated when a chat request sets no max_tokens (0: up to "
        "the context)", "N")
    max_tokens: int = setting(
        2048, parse_int, "most tokens any request may generate; more is capped to it (0: "
        "whatever context is left)", "N")
    embedding_memory: int = setting(
        128 * 1024**2, parse_size, "memory one embedding request may use for its batch (a "
        "decoder model computes logits for every token: 8 bytes x vocabulary a token; longer "
        "inputs take several batches)", "SIZE")
    threads: int = setting(0, parse_int, "CPU threads for llama.cpp (0: half the logical "
                           "CPUs, at least 1)", "N")
    n_gpu_layers: int | None = setting(
        None, parse_gpu_layers, "layers to offload to the GPU: auto (fit free VRAM), -1 (all) "
        "or a number", "auto|N", shown="auto")
    vram_margin: int = setting(512 * 1024**2, parse_size, "VRAM kept free by the offload "
                               "planner", "SIZE")
    gpu: int = setting(0, parse_int, "index of the GPU to plan and offload for", "INDEX")
    max_loaded: int = setting(
        1, parse_int, "models kept loaded at once; loading another swaps out the least "
        "recently used", "N")
    keep_alive: float = setting(
        300.0, parse_duration, "unload a model after this long idle (5m, 1h, seconds; "
        "negative: never)", "DURATION")
    load_timeout: float = setting(300.0, parse_duration, "how long a request waits for its "
                                  "model to load", "DURATION")
    max_queue: int = setting(
        64, parse_int, "requests allowed to wait per model before answering 429 (with "
        "llama-server: beyond its busy slots)", "N")
    request_timeout: float = setting(
        600.0, parse_duration, "longest a single request may run before it is cancelled",
        "DURATION")
    max_body: int = setting(4 * 1024**2, parse_size, "largest request body accepted (413 "
                            "past it)", "SIZE")
    max_header_size: int = setting(64 * 1024, parse_size, "longest request line and headers "
                                   "accepted (431 past it)", "SIZE")
    max_connections: int = setting(
        1000, parse_int, "client connections held at once; past it the longest idle one is "
        "closed, or a new one refused (503); fewer if the open-file limit says so", "N")
    first_request_timeout: float = setting(
        10.0, parse_duration, "a new connection must send its first request's headers "
        "within this long", "DURATION")
    header_timeout: float = setting(
        10.0, parse_duration, "a later request's headers must arrive within this long of "
        "its first byte, and a request body may pause no longer", "DURATION")
    api_key: str = setting("", str, "require 'Authorization: Bearer KEY' on every endpoint "
                           "but /health", "KEY")
    allow_unauthenticated: bool = setting(
        False, parse_bool, "allow binding a non-loopback address without an API key", "BOOL")
    cors_origins: tuple[str, ...] = setting((), parse_list, "origins allowed by CORS (off "
                                            "when empty)", "ORIGINS")
    allowed_hosts: tuple[str, ...] = setting(
        (), parse_list, "Host names accepted besides loopback ones and --host (against DNS "
        "rebinding; '*' accepts any)", "HOSTS")
    backend: str = setting(
        "auto", _choice("auto", "managed", "llamacpp", "llama-server"),
        "managed: each model in its own llama-server process; llamacpp: llama.cpp inside "
        "this process; llama-server: proxy to a llama-server you run; auto: managed when a "
        "llama-server binary is at hand, else llamacpp", "NAME")
    parallel: int = setting(
        4, parse_int, "managed mode: requests each model decodes at once (llama-server "
        "slots, each with the full n_ctx); fewer when memory says so", "N")
    llamacpp_url: str = setting("http://127.0.0.1:8080", str, "base URL of llama-server "
                                "when backend is llama-server", "URL")
    llamacpp_api_key: str = setting(
        "", str, "with backend llama-server: the key llama-server was started with "
        "(--api-key); sent to it as 'Authorization: Bearer KEY'", "KEY")
    llama_server_bin: Path | None = setting(
        None, _path, "the llama-server binary: managed mode runs models with it (default: "
        "this machine's build in ~/.cache/ml-offload, else llama-server on PATH); with "
        "backend llama-server, start it yourself on the llamacpp_url port and restart it if "
        "it dies", "PATH")
    upstreams: tuple[UpstreamConfig, ...] = setting(
        (), parse_upstreams, "a remote OpenAI-compatible server (llama-server, vLLM, another "
        "ml-offload) whose models are routed to it; repeat the flag for more (environment: "
        "comma-separated; TOML: [[upstreams]] tables with url, models, api_key_file, "
        "max_in_flight)", "URL", repeat="upstream")
    upstream_health_interval: float = setting(
        5.0, parse_duration, "how often each upstream is probed (its /v1/models)", "DURATION")
    log_level: str = setting("info", _choice("debug", "info", "warning", "error"),
                             "log verbosity (debug also logs prompt text)", "LEVEL")
    log_json: bool = setting(False, parse_bool, "log one JSON object per line", "BOOL")

    @property
    def effective_threads(self) -> int:
        """llama.cpp's threads spin at a barrier every layer: one more thread than there are
        free cores stalls a token for a whole scheduler slice. Half the logical CPUs (the
        physical cores on SMT machines) leaves room for the HTTP loop and the clients."""
        return self.threads if self.threads > 0 else max(1, (os.cpu_count() or 2) // 2)

    def token_limit(self, requested: int | None) -> int | None:
        """The max_tokens a request gets: what it asked for, else default_max_tokens (0:
        none), then no more than the max_tokens cap (0: none). None: up to the context."""
        wanted = requested if requested is not None else (self.default_max_tokens or None)
        if self.max_tokens and (wanted is None or wanted > self.max_tokens):
            return self.max_tokens
        return wanted

    @property
    def registry_path(self) -> Path:
        return self.data_dir / "registry.sqlite3"


# Options that are not settings themselves: files that hold a secret, and the TOML file.
_FILE_OPTIONS = (
    Option("api_key_file", None, _path,
           "read the API key from this file (keeps it out of the process list)", "FILE"),
    Option("llamacpp_api_key_file", None, _path, "read llamacpp_api_key from this file",
           "FILE"),
    Option("config", None, _path,
           "TOML file with any of these settings (keys as in this list)", "FILE"),
)
_AFTER = {"api_key_file": "api_key", "llamacpp_api_key_file": "llamacpp_api_key",
          "config": "log_json"}


def _options() -> tuple[Option, ...]:
    out: list[Option] = []
    for f in dataclasses.fields(Settings):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(Option(f.name, default, f.metadata["parse"], f.metadata["help"],
                          f.metadata["metavar"], shown_default=f.metadata["shown"],
                          repeat=f.metadata["repeat"]))
        out.extend(o for o in _FILE_OPTIONS if _AFTER[o.name] == f.name)
    return tuple(out)


OPTIONS: tuple[Option, ...] = _options()
OPTIONS_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def build_parser(prog: str = "python -m mloffload.server") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="ml-offload: an OpenAI-compatible API on llama.cpp. Every option can also "
        "be set as an environment variable (shown in brackets) or in a TOML file "
        "(--config); the command line wins over the environment, which wins over the file.",
    )
    for opt in OPTIONS:
        default = opt.shown_default or (
            opt.default if opt.default not in (None, [], (), "") else "none")
        parser.add_argument(
            opt.flag,
            dest=opt.name,
            metavar=opt.metavar,
            default=argparse.SUPPRESS,
            action="append" if opt.repeat else "store",
            help=f"{opt.help} [{opt.env}; default: {default}]",
        )
    return parser


def _from_mapping(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in values.items():
        opt = OPTIONS_BY_NAME.get(key.replace("-", "_"))
        if opt is None:
            raise ConfigError(f"{source}: unknown setting {key!r}")
        try:
            out[opt.name] = opt.parse(raw)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {opt.name}: {exc}") from None
    return out


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge defaults, the TOML file, the environment and the command line."""
    env = os.environ if environ is None else environ
    cli_raw = vars(build_parser().parse_args(list(argv or [])))
    cli = _from_mapping(cli_raw, "command line")
    env_values = _from_mapping(
        {o.name: env[o.env] for o in OPTIONS if o.env in env}, "environment"
    )
    config_path = cli.get("config") or env_values.get("config")
    file_values: dict[str, Any] = {}
    if config_path is not None:
        try:
            data = tomllib.loads(Path(config_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_path}: {exc}") from None
        file_values = _from_mapping(data, str(config_path))
    merged = {**file_values, **env_values, **cli}
    merged.pop("config", None)
    return settings_from(merged)


def settings_from(values: Mapping[str, Any]) -> Settings:
    """Build Settings from already-parsed values, resolving the API key files."""
    vals = dict(values)
    for key in ("api_key", "llamacpp_api_key"):
        key_file = vals.pop(f"{key}_file", None)
        if key_file is not None:
            try:
                vals[key] = Path(key_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read {key}_file {key_file}: {exc}") from None
            if not vals[key]:  # running with no key at all would be the silent result
                raise ConfigError(f"{key}_file {key_file} is empty; put the key in it, or "
                                  f"drop {key}_file to run without one")
    if "models_dir" in vals:
        vals["models_dir"] = tuple(Path(p).expanduser() for p in vals["models_dir"])
    for key in ("cors_origins", "allowed_hosts"):
        if key in vals:
            vals[key] = tuple(vals[key])
    if vals.get("data_dir") is None:
        vals.pop("data_dir", None)
    settings = Settings(**vals)
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    if not 0 < s.port < 65536:
        raise ConfigError(f"port must be between 1 and 65535, not {s.port}")
    if not 0 <= s.ollama_port < 65536 or s.ollama_port == s.port:
        raise ConfigError(f"ollama_port must be 0 (off) or a port from 1 to 65535 other than "
                          f"port {s.port}, not {s.ollama_port}")
    if s.n_ctx < 16:
        raise ConfigError(f"n_ctx must be at least 16, not {s.n_ctx}")
    if s.max_tokens < 0 or s.default_max_tokens < 0:
        raise ConfigError("max_tokens and default_max_tokens must not be negative (0: no cap)")
    if s.max_loaded < 1:
        raise ConfigError("max_loaded must be at least 1")
    if not 1 <= s.parallel <= 64:
        raise ConfigError(f"parallel must be between 1 and 64, not {s.parallel}")
    if s.max_queue < 0:
        raise ConfigError("max_queue must not be negative")
    for name in ("request_timeout", "first_request_timeout", "header_timeout"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name} must be positive")
    if s.max_connections < 1:
        raise ConfigError("max_connections must be at least 1")
    if s.max_header_size < 1024:
        raise ConfigError("max_header_size must be at least 1KiB")
    if s.upstream_health_interval <= 0:
        raise ConfigError("upstream_health_interval must be positive")
