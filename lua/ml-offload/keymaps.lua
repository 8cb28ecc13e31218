--- Global keymaps, from a declarative list. Each maps to a `<Plug>` map (plugin/ml-offload.lua),
--- so users who map their own can use those instead.
local M = {}

--- name (the option under `keymaps`), its <Plug> map, the command, whether it takes a range.
M.list = {
  { name = "chat", plug = "<Plug>(MLChat)", cmd = "MLChat", range = true, desc = "chat (visual: about the selection)" },
  { name = "toggle", plug = "<Plug>(MLChatToggle)", cmd = "MLChatToggle", desc = "hide or show the chat" },
  { name = "history", plug = "<Plug>(MLChatHistory)", cmd = "MLChatHistory", desc = "saved chats" },
  { name = "edit", plug = "<Plug>(MLEdit)", cmd = "MLEdit", range = true, desc = "rewrite the line or selection" },
  { name = "status", plug = "<Plug>(MLStatus)", cmd = "MLStatus", desc = "server status" },
  {
    name = "embed",
    plug = "<Plug>(MLEmbed)",
    cmd = "MLEmbed",
    range = true,
    desc = "embed the line (visual: the selection)",
  },
  { name = "models", plug = "<Plug>(MLModels)", cmd = "MLModels", desc = "models" },
}

M.modes = { "n", "x" }

--- Insert-mode <Plug> maps of ghost text (the keys themselves are `complete.keymaps`).
M.insert_list = {
  { plug = "<Plug>(MLCompleteAccept)", call = "accept('all')", desc = "take the suggestion" },
  { plug = "<Plug>(MLCompleteAcceptLine)", call = "accept('line')", desc = "take its first line" },
  { plug = "<Plug>(MLCompleteAcceptWord)", call = "accept('word')", desc = "take its first word" },
  { plug = "<Plug>(MLCompleteDismiss)", call = "dismiss()", desc = "hide the suggestion" },
  { plug = "<Plug>(MLCompleteTrigger)", call = "trigger()", desc = "suggest now" },
}

--- The <Plug> maps (run at startup by plugin/ml-offload.lua).
function M.plugs()
  for _, item in ipairs(M.insert_list) do
    local rhs = "<Cmd>lua require('ml-offload.complete')." .. item.call .. "<CR>"
    vim.keymap.set("i", item.plug, rhs, { silent = true, desc = "ml-offload: " .. item.desc })
  end
  for _, item in ipairs(M.list) do
    local desc = "ml-offload: " .. item.desc
    vim.keymap.set("n", item.plug, "<Cmd>" .. item.cmd .. "<CR>", { silent = true, desc = desc })
    -- In visual mode ":" inserts '<,'>, so the command gets the selection.
    local visual = item.range and (":" .. item.cmd .. "<CR>") or ("<Esc><Cmd>" .. item.cmd .. "<CR>")
    vim.keymap.set("x", item.plug, visual, { silent = true, desc = desc })
  end
end

local applied = {} -- lhs set by the last apply(), removed when setup() runs again

---@param keys MLOffloadKeymaps
function M.apply(keys)
  for _, m in ipairs(applied) do
    pcall(vim.keymap.del, m.mode, m.lhs)
  end
  applied = {}
  local config = require("ml-offload.config")
  for _, item in ipairs(M.list) do
    for _, lhs in ipairs(config.keys(keys and keys[item.name])) do
      for _, mode in ipairs(M.modes) do
        vim.keymap.set(mode, lhs, item.plug, { remap = true, silent = true, desc = "ml-offload: " .. item.desc })
        table.insert(applied, { mode = mode, lhs = lhs })
      end
    end
  end
end

return M
