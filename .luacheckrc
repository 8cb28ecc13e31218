-- luacheck for the Lua layer (Debian: lua-check); tests/test_lua_style.py runs it.
std = "luajit"
globals = { "vim" } -- fields are set too (vim.g.*, vim.b.*), so not read-only
max_line_length = 120
