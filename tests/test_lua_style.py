"""The Lua layer is linted (luacheck, .luacheckrc) and formatted (StyLua, stylua.toml).

``./dev test`` installs both: luacheck from Debian's lua-check, StyLua from the npm registry
into ~/.cache/ml-offload (ML_OFFLOAD_STYLUA_BIN).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LUA_DIRS = ["lua", "plugin"]


def tool(name: str, env: str | None, hint: str) -> str:
    path = os.environ.get(env, "") if env else ""
    if path and os.access(path, os.X_OK):
        return path
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: {hint} (./dev test installs it)")
    return found


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)


def lua_files() -> list[Path]:
    return sorted(p for d in LUA_DIRS for p in (REPO / d).rglob("*.lua"))


def test_there_is_lua_to_check() -> None:
    assert len(lua_files()) >= 5


def test_luacheck_is_clean() -> None:
    luacheck = tool("luacheck", None, "apt-get install lua-check")
    proc = run([luacheck, "--no-color", "--codes", *LUA_DIRS])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_luacheck_catches_a_stray_global(tmp_path: Path) -> None:
    luacheck = tool("luacheck", None, "apt-get install lua-check")
    bad = tmp_path / "bad.lua"
    bad.write_text("local M = {}\nfunction M.f()\n  result = 1\nend\nreturn M\n")
    proc = run([luacheck, "--no-color", "--codes", "--config", str(REPO / ".luacheckrc"),
                str(bad)])
    assert proc.returncode != 0 and "W111" in proc.stdout, proc.stdout


def test_stylua_formatting() -> None:
    stylua = tool("stylua", "ML_OFFLOAD_STYLUA_BIN",
                  "npm install @johnnymorganz/stylua-bin")
    proc = run([stylua, "--check", *LUA_DIRS])
    assert proc.returncode == 0, "run stylua lua plugin:\n" + proc.stdout + proc.stderr
