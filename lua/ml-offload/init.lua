--- ml-offload: a local LLM inside Neovim. See `:help ml-offload`.
---
--- The work (HTTP, streaming, the in-process fallback) happens in the remote plugin
--- (rplugin/python3/ml_offload.py), in threads; this Lua layer holds the configuration,
--- the commands and keymaps, the windows (chat, floats, diffs), the statusline state and
--- the `User` events. ml-offload.rpc is the boundary between the two.
local config = require("ml-offload.config")

local M = {}

local H = {} -- private helpers
H.active = {} -- request id -> { kind, model, backend }
H.last = nil -- the last finished request

M.events = {
  started = "MLOffloadRequestStarted",
  finished = "MLOffloadRequestFinished",
}

--- Generate the help tags when a manual install left them out (and the folder is ours
--- to write), so that `:help ml-offload` works without running `:helptags` by hand.
function H.helptags()
  local source = debug.getinfo(1, "S").source:gsub("^@", "")
  local doc = vim.fn.fnamemodify(source, ":p:h:h:h") .. "/doc"
  if vim.fn.filereadable(doc .. "/ml-offload.txt") == 1 and vim.fn.filereadable(doc .. "/tags") == 0 then
    if vim.fn.filewritable(doc) == 2 then
      pcall(vim.cmd.helptags, vim.fn.fnameescape(doc))
    end
  end
end

--- Merge options over the defaults (type-checked) and set the global keymaps. Safe to call
--- again: each call starts from the defaults. (The highlight groups are set when the first
--- window of the plugin opens.)
---@param opts? MLOffloadConfig
---@return table the module
function M.setup(opts)
  config.setup(opts)
  require("ml-offload.keymaps").apply(config.get().keymaps)
  require("ml-offload.statusline").setup()
  require("ml-offload.complete").setup()
  H.helptags()
  return M
end

--- A short statusline string: model · GPU layers or CPU · VRAM used/total · last tok/s ·
--- ghost-text state. Cached; never blocks (see :help ml-offload-statusline).
---@return string
function M.statusline()
  return require("ml-offload.statusline").get()
end

--- Make `model` the model for later requests (what `<CR>` in :MLModels does).
---@param model string
function M.set_model(model)
  config.set("model", model)
end

--- A short string for statuslines: "" when idle, else what is running and where.
---@return string
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
---@return { active: table, last: table? }
function M.state()
  return { active = vim.deepcopy(H.active), last = vim.deepcopy(H.last) }
end

---@param msg string
---@param level? integer vim.log.levels
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
