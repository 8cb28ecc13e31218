--- Highlight groups of the plugin's windows, linked to standard groups with `default = true`,
--- so a colorscheme or the user's own `:highlight` wins. Set again after `:colorscheme`.
local M = {}

M.groups = {
  MLOffloadNormal = { link = "NormalFloat" },
  MLOffloadBorder = { link = "FloatBorder" },
  MLOffloadTitle = { link = "FloatTitle" },
  MLOffloadFooter = { link = "FloatFooter" },
  MLOffloadHint = { link = "Comment" },
  MLOffloadWaiting = { link = "DiagnosticWarn" },
  MLOffloadError = { link = "DiagnosticError" },
  MLOffloadDone = { link = "DiagnosticOk" },
  MLOffloadGhost = { link = "Comment" }, -- ghost text (code completion)
}

--- The 'winhighlight' of every float the plugin opens.
M.float_winhighlight = table.concat({
  "NormalFloat:MLOffloadNormal",
  "FloatBorder:MLOffloadBorder",
  "FloatTitle:MLOffloadTitle",
  "FloatFooter:MLOffloadFooter",
}, ",")

function M.apply()
  for name, spec in pairs(M.groups) do
    vim.api.nvim_set_hl(0, name, vim.tbl_extend("force", { default = true }, spec))
  end
end

local done = false

--- Once per session (the first window of the plugin): the groups, and again after every
--- :colorscheme.
function M.setup()
  if done then
    return
  end
  done = true
  M.apply()
  vim.api.nvim_create_autocmd("ColorScheme", {
    group = vim.api.nvim_create_augroup("ml-offload-highlights", { clear = true }),
    callback = M.apply,
  })
end

return M
