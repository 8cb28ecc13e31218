--- The saved chats, through vim.ui.select: telescope, fzf-lua or snacks users get their own
--- picker. The remote plugin lists the files; the choice goes back to it.
local M = {}

--- items: { { path, label } }; action: what the remote plugin does with the chosen path.
function M.pick(items, action, prompt)
  vim.ui.select(items, {
    prompt = prompt or "ml-offload chats",
    kind = "ml-offload.chat",
    format_item = function(item)
      return item.label
    end,
  }, function(choice)
    if choice then
      require("ml-offload.rpc").request(action, { path = choice.path, source = require("ml-offload.chat").here() })
    end
  end)
end

return M
