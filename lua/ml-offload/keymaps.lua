--- Global keymaps, from a declarative list. Each maps to a `<Plug>` map (plugin/ml-offload.lua),
--- so users who map their own can use those instead.
local M = {}

M.list = {
  { name = "chat", plug = "<Plug>(MLChat)", desc = "ml-offload: chat (visual: about the selection)" },
  { name = "status", plug = "<Plug>(MLStatus)", desc = "ml-offload: server status" },
  { name = "embed", plug = "<Plug>(MLEmbed)", desc = "ml-offload: embed the line (visual: the selection)" },
  { name = "models", plug = "<Plug>(MLModels)", desc = "ml-offload: models" },
}

M.modes = { "n", "x" }

local applied = {} -- lhs set by the last apply(), removed when setup() runs again

function M.apply(keys)
  for _, m in ipairs(applied) do
    pcall(vim.keymap.del, m.mode, m.lhs)
  end
  applied = {}
  for _, item in ipairs(M.list) do
    local lhs = keys and keys[item.name]
    if lhs and lhs ~= "" then
      for _, mode in ipairs(M.modes) do
        vim.keymap.set(mode, lhs, item.plug, { remap = true, silent = true, desc = item.desc })
        table.insert(applied, { mode = mode, lhs = lhs })
      end
    end
  end
end

return M
