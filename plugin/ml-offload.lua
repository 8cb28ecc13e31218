-- ml-offload: <Plug> maps, and a clear message when the remote plugin is not registered.
-- Kept tiny: it runs at every startup. Everything else loads on first use.
if vim.g.loaded_ml_offload then
  return
end
vim.g.loaded_ml_offload = 1

local plugs = {
  { "<Plug>(MLChat)", "MLChat", true },
  { "<Plug>(MLStatus)", "MLStatus", false },
  { "<Plug>(MLEmbed)", "MLEmbed", true },
  { "<Plug>(MLModels)", "MLModels", false },
}
for _, p in ipairs(plugs) do
  local lhs, cmd, takes_range = p[1], p[2], p[3]
  vim.keymap.set("n", lhs, "<Cmd>" .. cmd .. "<CR>", { silent = true, desc = "ml-offload: " .. cmd })
  -- In visual mode ":" inserts '<,'> so the command gets the selected lines.
  local visual = takes_range and (":" .. cmd .. "<CR>") or ("<Esc><Cmd>" .. cmd .. "<CR>")
  vim.keymap.set("x", lhs, visual, { silent = true, desc = "ml-offload: " .. cmd })
end

-- The remote plugin defines the real commands from its manifest (:UpdateRemotePlugins).
-- Until it has, these stand-ins say what to do instead of "E492: Not an editor command".
for _, p in ipairs(plugs) do
  local cmd = p[2]
  if vim.fn.exists(":" .. cmd) ~= 2 then
    vim.api.nvim_create_user_command(cmd, function()
      vim.notify(
        "ml-offload: :"
          .. cmd
          .. " is not registered yet: run :UpdateRemotePlugins and restart"
          .. " Neovim (needs pynvim in g:python3_host_prog; see :checkhealth ml-offload)",
        vim.log.levels.ERROR
      )
    end, { nargs = "*", range = true, desc = "ml-offload (not registered yet)" })
  end
end
