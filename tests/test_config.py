"""Configuration: CLI > environment > TOML file > defaults, and what --help says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mloffload.config import (
    OPTIONS,
    ConfigError,
    Settings,
    UpstreamConfig,
    UpstreamModelName,
    load_settings,
    parse_duration,
    parse_size,
)
from mloffload.server.__main__ import check_bind


def test_defaults_need_no_configuration() -> None:
    s = load_settings([], environ={})
    assert s == Settings()
    assert (s.host, s.port, s.n_gpu_layers, s.max_loaded) == ("127.0.0.1", 9000, None, 1)
    assert s.data_dir.name == "ml-offload"


def test_precedence_cli_env_file_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "ml.toml"
    toml.write_text('port = 9100\nn_ctx = 1024\nthreads = 3\nmodels_dir = ["/a", "/b"]\n'
                    'keep_alive = "10m"\n')
    env = {"ML_OFFLOAD_CONFIG": str(toml), "ML_OFFLOAD_PORT": "9200", "ML_OFFLOAD_N_CTX": "2048"}
    s = load_settings(["--port", "9300"], environ=env)
    assert s.port == 9300  # CLI
    assert s.n_ctx == 2048  # env over file
    assert s.threads == 3  # file over default
    assert s.models_dir == (Path("/a"), Path("/b"))
    assert s.keep_alive == 600
    assert s.max_queue == 64  # default


def test_env_lists_sizes_durations_and_layers() -> None:
    s = load_settings([], environ={"ML_OFFLOAD_MODELS_DIR": "/x:/y", "ML_OFFLOAD_VRAM_MARGIN":
                                   "1GiB", "ML_OFFLOAD_KEEP_ALIVE": "-1",
                                   "ML_OFFLOAD_N_GPU_LAYERS": "12"})
    assert s.models_dir == (Path("/x"), Path("/y"))
    assert s.vram_margin == 1024**3 and s.keep_alive == -1 and s.n_gpu_layers == 12
    assert parse_duration("1h30m") == 5400 and parse_duration("250ms") == 0.25
    assert parse_size("512MiB") == 512 * 1024**2 and parse_size("8G") == 8 * 1024**3


def test_api_key_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert load_settings(["--api-key-file", str(key)], environ={}).api_key == "s3cret"


@pytest.mark.parametrize("env", [
    {"ML_OFFLOAD_PORT": "http"}, {"ML_OFFLOAD_PORT": "70000"},
    {"ML_OFFLOAD_N_GPU_LAYERS": "lots"}, {"ML_OFFLOAD_KEEP_ALIVE": "a while"},
    {"ML_OFFLOAD_BACKEND": "ollama"}, {"ML_OFFLOAD_CONFIG": "/nonexistent.toml"},
    {"ML_OFFLOAD_KEEP_ALIVE": "nan"}, {"ML_OFFLOAD_KEEP_ALIVE": "inf"},
    {"ML_OFFLOAD_REQUEST_TIMEOUT": "nan"}, {"ML_OFFLOAD_LOAD_TIMEOUT": "1e999"},
    {"ML_OFFLOAD_REQUEST_TIMEOUT": "-inf"},
])
def test_bad_values_are_clear_errors(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load_settings([], environ=env)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999", float("nan"),
                                   float("inf")])
def test_durations_are_finite(value: str | float) -> None:
    with pytest.raises(ConfigError, match="not a duration"):
        parse_duration(value)


def test_upstreams_from_flags_environment_and_toml(tmp_path: Path) -> None:
    # The simple case: URLs, a key in one of them; the URL kept has no credentials.
    flags = ["--upstream", "http://gpu-box:8080", "--upstream", "http://k3y%2Fin-url@10.0.0.7:8000/v1/"]
    s = load_settings(flags, environ={})
    assert [u.url for u in s.upstreams] == ["http://gpu-box:8080", "http://10.0.0.7:8000"]
    assert [u.api_key for u in s.upstreams] == ["", "k3y/in-url"]
    assert s.upstreams[1].key_source == "the key in its URL"
    assert "k3y" not in repr(s) and "k3y" not in str(s.upstreams)
    env = {"ML_OFFLOAD_UPSTREAMS": "http://a:1, https://user:pw@b:2"}
    s = load_settings([], environ=env)
    assert [(u.url, u.api_key) for u in s.upstreams] == [("http://a:1", ""), ("https://b:2", "pw")]
    # TOML: tables with models (aliases allowed), a key file and a limit; the flag wins.
    key = tmp_path / "vllm.key"
    key.write_text("s3cret\n")
    toml = tmp_path / "ml.toml"
    toml.write_text(f'''
[[upstreams]]
url = "http://gpu-box:8080"
[[upstreams]]
url = "http://10.0.0.7:8000"
models = ["qwen2.5-coder-32b", {{ id = "Qwen/Qwen2.5-7B", aliases = ["chat", "q7"] }}]
api_key_file = "{key}"
max_in_flight = 8
''')
    s = load_settings(["--config", str(toml)], environ={})
    assert s.upstreams == (
        UpstreamConfig("http://gpu-box:8080"),
        UpstreamConfig("http://10.0.0.7:8000", (
            UpstreamModelName("qwen2.5-coder-32b"),
            UpstreamModelName("Qwen/Qwen2.5-7B", ("chat", "q7"))), "s3cret",
            f"the key in api_key_file {key} of its [[upstreams]] entry", 8))
    assert load_settings(["--config", str(toml), "--upstream", "http://c:3"],
                         environ={}).upstreams == (UpstreamConfig("http://c:3"),)
    assert load_settings([], environ={}).upstreams == ()


@pytest.mark.parametrize(("toml", "said"), [
    ('upstreams = ["ftp://x"]', "http:// or https://"),
    ('upstreams = ["http://"]', "with a host"),
    ('upstreams = ["http://a:1", "http://a:1/"]', "more than once"),
    ('[[upstreams]]\nurl = "http://a:1"\nmax_in_flight = 0', "positive integer"),
    ('[[upstreams]]\nurl = "http://a:1"\nkey = "x"', "may have api_key_file"),
    ('[[upstreams]]\nmodels = ["m"]', "needs url"),
    ('[[upstreams]]\nurl = "http://a:1"\nmodels = "m"', "must be a list"),
    ('[[upstreams]]\nurl = "http://a:1"\nmodels = [{ name = "m" }]', "a model is an id"),
    ('[[upstreams]]\nurl = "http://a:1"\napi_key_file = "/nonexistent/key"',
     "cannot read api_key_file"),
    ('upstream_health_interval = "0s"', "must be positive"),
])
def test_bad_upstreams_are_clear_errors(tmp_path: Path, toml: str, said: str) -> None:
    path = tmp_path / "ml.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=said.replace("(", r"\(")):
        load_settings(["--config", str(path)], environ={})


def test_a_bad_upstream_url_error_hides_its_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(["--upstream", "ftp://secret-key@host"], environ={})
    assert "secret-key" not in str(err.value)


def test_unknown_file_key(tmp_path: Path) -> None:
    toml = tmp_path / "ml.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load_settings(["--config", str(toml)], environ={})


def test_help_documents_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "mloffload.server", "--help"], text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for opt in OPTIONS:
        assert opt.flag in text and opt.env in text, opt.name


def test_public_bind_needs_a_key() -> None:
    with pytest.raises(ConfigError, match="API key"):
        check_bind(Settings(host="0.0.0.0"))
    check_bind(Settings(host="0.0.0.0", api_key="k"))
    check_bind(Settings(host="0.0.0.0", allow_unauthenticated=True))
    check_bind(Settings(host="::1"))


def test_readme_documents_every_option() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for opt in OPTIONS:
        assert f"| `{opt.flag}` | `{opt.env}` |" in readme, opt.name


@pytest.mark.parametrize("content", ["", "\n", "   \n\t\n"])
@pytest.mark.parametrize("option", ["--api-key-file", "--llamacpp-api-key-file"])
def test_an_empty_key_file_is_refused(tmp_path: Path, content: str, option: str) -> None:
    key = tmp_path / "key"
    key.write_text(content)
    with pytest.raises(ConfigError, match="is empty"):
        load_settings([option, str(key)], environ={})
    out = subprocess.run([sys.executable, "-m", "mloffload.server", option, str(key),
                          "--port", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "is empty" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("env", [
    {"ML_OFFLOAD_MAX_CONNECTIONS": "0"}, {"ML_OFFLOAD_HEADER_TIMEOUT": "0"},
    {"ML_OFFLOAD_FIRST_REQUEST_TIMEOUT": "-1"}, {"ML_OFFLOAD_MAX_HEADER_SIZE": "10"},
])
def test_edge_limits_must_be_usable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load_settings([], environ=env)


def test_the_shipped_token_defaults() -> None:
    """What the README promises: a chat that names no max_tokens gets 512, and no request
    more than 2048 unless the cap is raised."""
    s = Settings()
    assert s.default_max_tokens == 512 and s.max_tokens == 2048
    assert s.token_limit(None) == 512 and s.token_limit(4096) == 2048
