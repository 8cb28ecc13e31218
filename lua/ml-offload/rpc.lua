--- The boundary between the Lua layer and the remote plugin (Python), both ways.
---
--- Python -> Lua: `M.exports` lists every Lua function the Python side may call, by name;
--- Python reaches them only through `M.call(name, ...)` (its wrapper is
--- python/mloffload/nvim/lua.py, one method per name). Modules load on first use.
---
--- Lua -> Python: `M.request(action, payload)` calls the remote plugin's `MLOffloadCall`
--- (asynchronously) with the merged configuration attached; Python dispatches `action`
--- through its action table (python/mloffload/nvim/actions.py).
local M = {}

--- name -> { module, function }
---@type table<string, string[]>
M.exports = {
  -- messages, events, options
  notify = { "ml-offload", "notify" },
  event = { "ml-offload", "_event" },
  config = { "ml-offload.config", "resolved" },
  set_model = { "ml-offload", "set_model" },
  -- information floats (:MLStatus, :MLModels)
  float_open = { "ml-offload.float", "open_tracked" },
  float_set_lines = { "ml-offload.float", "set_lines" },
  float_close = { "ml-offload.float", "close_buf" },
  -- the chat window
  chat_open = { "ml-offload.chat", "open" },
  chat_lines = { "ml-offload.chat.buffer", "lines" },
  chat_show = { "ml-offload.chat", "show" },
  chat_answer_start = { "ml-offload.chat.buffer", "answer_start" },
  chat_stream = { "ml-offload.chat.buffer", "stream" },
  chat_answer_end = { "ml-offload.chat.buffer", "answer_end" },
  chat_status = { "ml-offload.chat", "set_status" },
  chat_find = { "ml-offload.chat", "find" },
  chat_forget = { "ml-offload.chat", "forget" },
  context_gather = { "ml-offload.chat.context", "gather" },
  history_pick = { "ml-offload.chat.history", "pick" },
  -- diff proposals (:MLEdit, applying a code block)
  diff_open = { "ml-offload.diff", "open" },
  diff_update = { "ml-offload.diff", "update" },
  diff_status = { "ml-offload.diff", "set_status" },
  -- ghost text through the remote plugin (the in-process fallback)
  complete_update = { "ml-offload.complete", "on_python" },
}

--- Called by the Python wrapper: the export `name` with the rest of the arguments.
function M.call(name, ...)
  local target = M.exports[name]
  if target == nil then
    error("ml-offload: no Lua export named " .. tostring(name), 0)
  end
  return require(target[1])[target[2]](...)
end

--- The export names, sorted (the tests compare them with the Python wrapper's).
---@return string[]
function M.names()
  local out = vim.tbl_keys(M.exports)
  table.sort(out)
  return out
end

local function registered()
  return vim.fn.exists("*MLOffloadCall") == 1 or vim.fn.exists("#FuncUndefined#MLOffloadCall") == 1
end

--- Hand `action` to the remote plugin, asynchronously, with the merged configuration.
--- Explains how to register the remote plugin when it is missing.
---@param action string
---@param payload? table
function M.request(action, payload)
  local notify = require("ml-offload").notify
  if not registered() then
    notify(
      "the remote plugin is not registered: run :UpdateRemotePlugins and restart Neovim"
        .. " (see :checkhealth ml-offload)",
      vim.log.levels.ERROR
    )
    return
  end
  payload = payload or {}
  payload.config = require("ml-offload.config").resolved()
  local ok, err = pcall(vim.fn.MLOffloadCall, action, payload)
  if not ok then
    notify("the Python host failed: " .. tostring(err) .. " (see :checkhealth ml-offload)", vim.log.levels.ERROR)
  end
end

return M
