"""The Neovim plugin against a real headless Neovim 0.11 and a real server (issue 6).

Each test starts its own editor that reads the manifest :UpdateRemotePlugins wrote, and
checks what a user sees: floats, titles, streamed text, notifications, :messages.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import REPO, ServerProcess, free_port
from nvim_harness import Editor, StubServer, nvim_binary

pytestmark = pytest.mark.timeout(600)

Factory = Callable[..., Editor]


def requests_status(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/status", timeout=10).json()["requests"])


def assert_clean(ed: Editor) -> None:
    assert ed.error_lines() == [], ed.messages()


# --- registration, commands, keymaps -----------------------------------------------------


COMMANDS = ("MLChat", "MLChatNew", "MLChatSend", "MLChatToggle", "MLChatHistory",
            "MLChatDelete", "MLEdit", "MLAccept", "MLReject", "MLStatus", "MLEmbed", "MLModels")
GLOBAL_KEYS = (("mc", "MLChat"), ("mt", "MLChatToggle"), ("mh", "MLChatHistory"),
               ("mi", "MLEdit"), ("ms", "MLStatus"), ("me", "MLEmbed"), ("mm", "MLModels"))


def test_commands_keymaps_and_plug_maps(editor: Factory) -> None:
    ed = editor(keymaps={"models": False, "status": "<leader>xs"})
    commands = ed.nvim.api.get_commands({})
    for name in COMMANDS:
        assert commands[name]["definition"].startswith("ml-offload: "), commands[name]
    for name in ("MLChat", "MLChatNew", "MLEdit", "MLEmbed"):
        assert commands[name]["range"] == "." and commands[name]["nargs"] == "*", name
    # The commands reach the remote plugin through its registered function.
    assert ed.nvim.funcs.exists("#FuncUndefined#MLOffloadCall") == 1

    def rhs(mode: str, lhs: str) -> str:
        return str(ed.nvim.funcs.maparg(lhs, mode))

    for mode in ("n", "x"):
        assert rhs(mode, "<leader>mc") == "<Plug>(MLChat)"
        assert rhs(mode, "<leader>mi") == "<Plug>(MLEdit)"
        assert rhs(mode, "<leader>xs") == "<Plug>(MLStatus)"
        assert rhs(mode, "<leader>ms") == ""  # remapped
        assert rhs(mode, "<leader>mm") == ""  # disabled with false
        for _, plug in GLOBAL_KEYS:
            assert plug in rhs(mode, f"<Plug>({plug})")
    # In visual mode the range commands get the selection (":" inserts '<,'>).
    for plug in ("MLChat", "MLEmbed", "MLEdit"):
        assert rhs("x", f"<Plug>({plug})") == f":{plug}<CR>"
    assert rhs("n", "<Plug>(MLChat)") == "<Cmd>MLChat<CR>"
    # Defaults, and setup() again restores them.
    ed.lua("require('ml-offload').setup({})")
    for mode in ("n", "x"):
        for lhs, plug in GLOBAL_KEYS:
            assert rhs(mode, f"<leader>{lhs}") == f"<Plug>({plug})"
        assert rhs(mode, "<leader>xs") == ""
    assert ed.lua("return require('ml-offload.config').get().api_url") == "http://127.0.0.1:9000"
    assert ed.lua("return require('ml-offload').status()") == ""
    assert_clean(ed)


def test_setup_checks_types_and_sets_default_highlights(editor: Factory) -> None:
    ed = editor()
    for opts, named in (({"timeout": "soon"}, "timeout"), ({"chat": {"layout": "popup"}},
                                                           "chat.layout"),
                        ({"keymaps": {"chat": 3}}, "keymaps.chat"),
                        ({"window": {"width": 2}}, "window.width")):
        err = ed.lua("local ok, e = pcall(require('ml-offload').setup, ...); return e", opts)
        assert "ml-offload: setup(): " in err and named in err, err
    ed.lua("require('ml-offload').setup({})")
    # Lists replace, tables merge.
    ed.lua("require('ml-offload').setup({ diff = { keymaps = { reject = { 'x' } } } })")
    assert ed.lua("return require('ml-offload.config').get().diff.keymaps.reject") == ["x"]
    assert ed.lua("return require('ml-offload.config').get().diff.keymaps.accept") == "ga"
    # The groups are set when the first window opens; the user's own colours win.
    ed.nvim.command("highlight MLOffloadTitle guifg=#ff0000")
    ed.nvim.command("MLChatNew")
    ed.wait(lambda: ed.chats(), what="a chat window")
    for group, link in (("MLOffloadNormal", "NormalFloat"), ("MLOffloadBorder", "FloatBorder"),
                        ("MLOffloadWaiting", "DiagnosticWarn"), ("MLOffloadError",
                                                                 "DiagnosticError")):
        assert ed.nvim.api.get_hl(0, {"name": group})["link"] == link
    assert ed.nvim.api.get_hl(0, {"name": "MLOffloadTitle"}).get("fg") == 0xFF0000
    assert "FloatTitle:MLOffloadTitle" in ed.lua("return vim.wo.winhighlight")
    ed.nvim.command("colorscheme default")  # clears the groups; they come back
    assert ed.nvim.api.get_hl(0, {"name": "MLOffloadNormal"})["link"] == "NormalFloat"
    assert_clean(ed)


def test_lua_and_python_agree_on_the_boundary(editor: Factory) -> None:
    """Every Lua function Python calls is in rpc.lua's list and the other way round; every
    action the Lua layer requests is in Python's action table; only lua.py calls Lua."""
    from mloffload.nvim import lua as lua_wrapper

    ed = editor()
    exports = ed.lua("return require('ml-offload.rpc').names()")
    wrapper = (REPO / "python/mloffload/nvim/lua.py").read_text()
    called = sorted(set(re.findall(r'self\._call\("(\w+)"', wrapper)))
    assert called == exports
    assert all(hasattr(lua_wrapper.Lua, name) for name in exports)
    for path in (REPO / "python/mloffload/nvim").rglob("*.py"):
        if path.name != "lua.py":
            assert "exec_lua" not in path.read_text(), path

    lua_files = "\n".join(p.read_text() for p in (REPO / "lua").rglob("*.lua"))
    requested = set(re.findall(r'request\(\s*"(\w+)"', lua_files))
    table = ed.lua("local out = {} for _, k in pairs(require('ml-offload.float').kinds) do "
                   "for _, key in ipairs(k.keys) do table.insert(out, key[2]) end end "
                   "return out")
    requested |= {a for a in table if a != "close"}
    names = set(_action_names())
    assert requested <= names, requested - names
    assert {"history_open", "history_remove", "chat", "edit", "proposal_closed"} <= names


def _action_names() -> list[str]:
    """The real action table, built as the plugin builds it."""
    from mloffload.nvim.actions import Actions
    from mloffload.nvim.app import PARTS
    from mloffload.nvim.bridge import Bridge
    from mloffload.nvim.requests import Requests
    from mloffload.nvim.routing import Router
    from mloffload.nvim.services import Services

    bridge = Bridge(None)
    services = Services(bridge, Router(), Requests(bridge))
    actions = Actions()
    for make in PARTS:
        actions.add(make(services).actions())
    return actions.names()


def test_the_default_port_is_9000_everywhere() -> None:
    """The seed's port-8000 mistake must not exist in the plugin or its docs."""
    paths = [*REPO.glob("lua/**/*.lua"), *REPO.glob("plugin/*.lua"),
             *REPO.glob("rplugin/**/*.py"), *REPO.glob("python/mloffload/nvim/**/*.py"),
             REPO / "doc/ml-offload.txt"]
    for path in paths:
        assert not re.search(r"\b8000\b", path.read_text()), path
    assert "http://127.0.0.1:9000" in (REPO / "lua/ml-offload/config.lua").read_text()


def test_entry_file_is_thin_and_finds_the_checkout(tmp_path: Path) -> None:
    """Importing the rplugin file (what :UpdateRemotePlugins does) loads no implementation,
    and in a host where mloffload is not installed it uses the checkout's python/."""
    import pynvim

    site = Path(pynvim.__file__).parent.parent
    entry = str(REPO / "rplugin/python3/ml_offload.py")
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('mloffload') is None, 'mloffload is installed'\n"
        f"spec = importlib.util.spec_from_file_location('e', {entry!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "heavy = [m for m in ('mloffload.nvim', 'httpx', 'llama_cpp') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import mloffload.nvim.app\n"
        "print(mloffload.nvim.app.__file__)\n"
    )
    # -S: no site, so the editable install's .pth is not read; pynvim still importable.
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(site)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(REPO / "python"))


def test_helptags_run_clean(tmp_path: Path) -> None:
    doc = tmp_path / "doc"
    doc.mkdir()
    (doc / "ml-offload.txt").write_text((REPO / "doc/ml-offload.txt").read_text())
    out = subprocess.run([nvim_binary(), "--headless", "-u", "NONE", "-i", "NONE", "-c",
                          f"try | helptags {doc} | catch | cquit 3 | endtry", "-c", "qall"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "E" not in out.stderr, out.stderr
    tags = (doc / "tags").read_text()
    for tag in ("ml-offload", "ml-offload-install", "ml-offload-deploy", ":MLChat",
                ":checkhealth-ml-offload", "ml-offload-fallback", "ml-offload-troubleshooting"):
        assert f"{tag}\t" in tags, tag


def test_setup_generates_missing_help_tags(editor: Factory, tmp_path: Path) -> None:
    """A manual runtimepath install has no doc/tags (E149 for :help ml-offload): setup()
    writes them when the folder is writable."""
    import shutil

    plugin = tmp_path / "ml-offload"
    for part in ("lua", "plugin", "doc"):
        shutil.copytree(REPO / part, plugin / part, ignore=shutil.ignore_patterns("tags"))
    assert not (plugin / "doc/tags").exists()
    ed = editor()
    ed.nvim.command(f"set runtimepath^={plugin}")
    ed.lua("package.loaded['ml-offload'] = nil; for k in pairs(package.loaded) do "
           "if k:match('^ml%-offload') then package.loaded[k] = nil end end")
    assert ed.lua("return require('ml-offload').setup({}) ~= nil")
    assert (plugin / "doc/tags").exists()
    ed.nvim.command("help ml-offload")
    assert ed.nvim.current.buffer.name == str(plugin / "doc/ml-offload.txt")
    assert_clean(ed)


# --- status, models, embed -----------------------------------------------------------------


def test_status_float(editor: Factory, server: ServerProcess) -> None:
    httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    ed = editor(api_url=server.url)
    ed.nvim.command("MLStatus")
    ed.wait_event("finished")
    status = httpx.get(server.url + "/status", timeout=10).json()
    vram = httpx.get(server.url + "/vram", timeout=10).json()
    win = ed.floats()[0]
    text = "\n".join(win["lines"])
    assert "status" in win["title"]
    assert f"Server    {server.url}: healthy" in text
    assert "Backend   llamacpp: ready" in text
    model = status["loaded_models"][0]
    assert (f"Model     {model['id']}: {model['n_gpu_layers']}/{model['max_layers']} layers "
            "on GPU") in text
    if vram["available"]:
        for gpu in vram["gpus"]:
            assert f"GPU {gpu['index']}" in text
        assert "█" in text or "░" in text
    else:
        assert f"VRAM      no GPU: {vram['reason']}" in text
    ed.keys("q")
    ed.wait(lambda: ed.floats() == [], what="q to close the float")
    assert_clean(ed)


def test_models_float_and_select(editor: Factory, server: ServerProcess) -> None:
    ed = editor(api_url=server.url)
    ed.nvim.command("MLModels")
    ed.wait_event("finished")
    cards = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
    n_ctx = httpx.get(server.url + "/api/backend/info", timeout=10).json()["settings"]["n_ctx"]
    win = ed.floats()[0]
    assert "models" in win["title"] and "llamacpp" in win["title"]
    lines = win["lines"]
    current = next(c["id"] for c in cards if "default" in c["meta"]["aliases"])
    cursor = ed.nvim.api.win_get_cursor(win["win"])[0]
    assert lines[cursor - 1].startswith(f"* {current} ")  # on the current model, not the header
    for card in cards:
        meta = card["meta"]
        row = next(i for i, line in enumerate(lines) if f" {card['id']} " in line)
        line = lines[row]
        # the context the server runs (n_ctx), not the file's trained length
        served = min(n_ctx, meta["context_length"])
        assert meta["quantization"] in line and re.search(rf"\s{served}\s", line), line
        assert served == n_ctx == 2048 and str(meta["context_length"]) not in line
        assert f"{meta['file_size'] / 1024**2:.0f} MiB" in line
        assert ("loaded" in line) == meta["loaded"]
    target = cards[0]["id"]
    row = next(i for i, line in enumerate(lines) if f" {target} " in line)
    ed.nvim.api.win_set_cursor(win["win"], [row + 1, 0])
    ed.keys("<CR>")
    ed.wait(lambda: ed.lua("return require('ml-offload.config').get().model") == target,
            what="the model to be selected")
    ed.wait(lambda: f"model set to {target} for later requests" in ed.messages(),
            what="the notification")
    assert ed.floats() == []
    assert_clean(ed)


def test_embed_selection_notifies_dimensions(editor: Factory, server: ServerProcess) -> None:
    dims = httpx.post(server.url + "/v1/embeddings", timeout=60,
                      json={"model": "default", "input": "x"}).json()["data"][0]["embedding"]
    ed = editor(api_url=server.url, embed_register="e")
    ed.nvim.current.buffer[:] = ["alpha", "beta", "gamma"]
    ed.keys("jVj<leader>me")
    ed.wait_event("finished")
    assert f"ml-offload: embedding: {len(dims)} dimensions (default)" in ed.messages()
    vector = json.loads(ed.nvim.funcs.getreg("e"))
    direct = httpx.post(server.url + "/v1/embeddings", timeout=60, json={
        "model": "default", "input": "beta\ngamma"}).json()["data"][0]["embedding"]
    assert len(vector) == len(dims)
    assert max(abs(a - b) for a, b in zip(vector, direct, strict=True)) < 1e-4
    # Normal mode on an empty line: what is empty, not "select some text".
    ed.nvim.current.buffer[:] = ["alpha", ""]
    ed.nvim.api.win_set_cursor(0, [2, 0])
    ed.keys("<leader>me")
    ed.wait(lambda: ed.notifications(3), what="the warning")
    assert ed.notifications(3) == ["ml-offload: nothing to embed: the current line is empty "
                                   "(:MLEmbed {text} embeds text)"]
    assert len(ed.finished()) == 1  # nothing was sent
    assert_clean(ed)


@pytest.mark.parametrize("status", [401, 404])
def test_status_float_says_what_an_http_error_means(editor: Factory, status: int) -> None:
    """Bug 2: with a server that answers 401 or 404, the float itself says so at once."""
    stub = StubServer(status, "Not Found" if status == 404 else "Invalid API key",
                      None if status == 404 else "invalid_api_key")
    try:
        ed = editor(api_url=stub.url)
        ed.nvim.command("MLStatus")
        win = ed.wait_float(lambda f: "error" in "\n".join(f["lines"]), timeout=10,
                            what="the error in the float")
        text = "\n".join(win["lines"])
        assert "checking" not in text and f"server error {status}" in text
        if status == 401:
            assert "set api_key in require('ml-offload').setup() or $ML_OFFLOAD_API_KEY" in text
        else:
            assert "is api_url" in text and "an ml-offload server?" in text
        assert "Traceback" not in ed.messages()
    finally:
        stub.close()


def test_floats_stay_inside_a_resized_editor(editor: Factory) -> None:
    """Bug 6: after VimResized every float (chat and information) fits again."""
    stub = StubServer(404, "Not Found", None)
    try:
        ed = editor(api_url=stub.url, window={"width": 0.9, "height": 0.8})
        ed.nvim.command("MLChatNew")
        ed.keys("<Esc>")
        ed.nvim.command("MLStatus")
        ed.wait_finished()
        assert len(ed.floats()) == 2
        ed.nvim.options["columns"] = 80
        ed.nvim.options["lines"] = 24
        for f in ed.floats():
            cfg = ed.nvim.api.win_get_config(f["win"])
            width = ed.nvim.api.win_get_width(f["win"])
            height = ed.nvim.api.win_get_height(f["win"])
            assert cfg["col"] + width + 2 <= 80, (cfg, width)
            assert cfg["row"] + height + 2 <= 24 - 2, (cfg, height)
        assert_clean(ed)
    finally:
        stub.close()


# --- health --------------------------------------------------------------------------------


def checkhealth(ed: Editor) -> str:
    ed.nvim.command("checkhealth ml-offload")
    return "\n".join(ed.nvim.current.buffer[:])


def test_checkhealth_with_the_server_up(editor: Factory, server: ServerProcess) -> None:
    ed = editor(api_url=server.url)
    report = checkhealth(ed)
    assert "ERROR" not in report, report
    assert f"OK {server.url}: healthy (backend llamacpp)" in report
    assert "OK remote plugin functions in the manifest" in report
    assert "OK httpx" in report and "OK pynvim" in report
    assert "OK engine: llama-cpp-python" in report  # fallback readiness
    assert re.search(r"OK plan: \d+/\d+ layers on GPU", report)
    assert "GPU" in report


def test_checkhealth_names_the_problem_when_the_server_is_down(editor: Factory) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    ed = editor(api_url=url, fallback=False)
    report = checkhealth(ed)
    assert re.search(rf"ERROR server not reachable: .*{re.escape(url)} \(connection refused\)",
                     report), report
    assert "python -m mloffload.server" in report
    assert "off (fallback = false)" in report


def test_checkhealth_on_a_refused_key_says_set_api_key(editor: Factory) -> None:
    """Bug 4: a 401 is not "not reachable, start the server"."""
    stub = StubServer(401)
    try:
        ed = editor(api_url=stub.url)
        report = checkhealth(ed)
        assert "ERROR the server refused the API key" in report, report
        assert "set api_key in require('ml-offload').setup" in report
        assert "ML_OFFLOAD_API_KEY" in report
        assert "not reachable" not in report and "python -m mloffload.server" not in report
    finally:
        stub.close()
