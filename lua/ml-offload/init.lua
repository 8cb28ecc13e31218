--- ml-offload: a local LLM inside Neovim. See `:help ml-offload`.
---
--- The work (HTTP, streaming, the in-process fallback) happens in the remote plugin
--- (rplugin/python3/ml_offload.py), in threads; this Lua layer holds the configuration,
--- the keymaps, the statusline state, the `User` events, and small UI helpers.
local config = require("ml-offload.config")

local M = {}

local H = {} -- private helpers
H.active = {} -- request id -> { kind, model, backend }
H.last = nil -- the last finished request

M.events = {
  started = "MLOffloadRequestStarted",
  finished = "MLOffloadRequestFinished",
}

--- Merge options over the defaults and set the global keymaps. Safe to call again.
function M.setup(opts)
  config.setup(opts)
  require("ml-offload.keymaps").apply(config.get().keymaps)
  return M
end

--- Make `model` the model for later requests (what `<CR>` in :MLModels does).
function M.set_model(model)
  config.set("model", model)
end

--- A short string for statuslines: "" when idle, else what is running and where.
function M.status()
  local n, item = 0, nil
  for _, r in pairs(H.active) do
    n = n + 1
    item = r
  end
  if n == 0 then
    return ""
  end
  local where = item.backend == "fallback" and " (local)" or ""
  local more = n > 1 and (" +" .. (n - 1)) or ""
  return string.format("ML %s%s%s", item.kind, where, more)
end

--- Details behind `status()`: active requests and the last finished one.
function M.state()
  return { active = vim.deepcopy(H.active), last = vim.deepcopy(H.last) }
end

--- Call the remote plugin (asynchronously). Explains how to register it if it is missing.
function M.call(action, payload)
  if vim.fn.exists("*MLOffloadCall") == 0 and vim.fn.exists("#FuncUndefined#MLOffloadCall") == 0 then
    M.notify(
      "the remote plugin is not registered: run :UpdateRemotePlugins and restart Neovim"
        .. " (see :checkhealth ml-offload)",
      vim.log.levels.ERROR
    )
    return
  end
  local ok, err = pcall(vim.fn.MLOffloadCall, action, payload or vim.empty_dict())
  if not ok then
    M.notify("the Python host failed: " .. tostring(err) .. " (see :checkhealth ml-offload)", vim.log.levels.ERROR)
  end
end

--- Ask the user for text (vim.ui.input), then send it to the remote plugin as payload.prompt.
function M.ask(prompt, action, payload)
  vim.schedule(function()
    vim.ui.input({ prompt = prompt }, function(text)
      if text and vim.trim(text) ~= "" then
        payload = payload or {}
        payload.prompt = text
        M.call(action, payload)
      end
    end)
  end)
end

function M.notify(msg, level)
  vim.notify("ml-offload: " .. msg, level or vim.log.levels.INFO, { title = "ml-offload" })
end

--- Called by the remote plugin when a request starts or ends: keeps the statusline state
--- and fires `User MLOffloadRequestStarted` / `User MLOffloadRequestFinished`.
function M._event(stage, data)
  local id = data.id
  if stage == "started" then
    H.active[id] = { kind = data.kind, model = data.model, backend = data.backend }
  else
    H.active[id] = nil
    H.last = data
  end
  vim.api.nvim_exec_autocmds("User", { pattern = M.events[stage], modeline = false, data = data })
end

return M
