--- Every user command, from one declarative list. A command with `action` is handed to the
--- remote plugin (with its arguments, its selection and where the user is); one with `run`
--- is done here.
local M = {}

local function chat()
  return require("ml-offload.chat")
end

local function diff()
  return require("ml-offload.diff")
end

local function payload(opts, always)
  local selection = require("ml-offload.selection")
  local out = selection.command_payload(opts)
  if always and out.selection == nil then
    -- no range: the cursor's line
    out.selection = selection.capture(opts.line1, opts.line2, 1)
  end
  return out
end

local function request(action, opts, always)
  require("ml-offload.rpc").request(action, payload(opts, always))
end

---@class MLOffloadCommand
---@field name string
---@field desc string
---@field nargs? string
---@field range? boolean
---@field complete? fun(): string[]
---@field run fun(opts: table)

---@type MLOffloadCommand[]
M.list = {
  {
    name = "MLChat",
    nargs = "*",
    range = true,
    desc = "chat: the last chat again; with [prompt] or a range, a new chat",
    run = function(opts)
      if opts.args == "" and opts.range == 0 then
        chat().reopen_or_new()
      else
        request("chat", opts)
      end
    end,
  },
  {
    name = "MLChatNew",
    nargs = "*",
    range = true,
    desc = "a new chat (about [prompt] or the range)",
    run = function(opts)
      request("chat", opts)
    end,
  },
  {
    name = "MLChatSend",
    desc = "send the message under the chat's last ## You",
    run = function()
      chat().send()
    end,
  },
  {
    name = "MLChatToggle",
    desc = "hide or show the last chat",
    run = function()
      chat().toggle()
    end,
  },
  {
    name = "MLChatHistory",
    desc = "pick a saved chat to reopen",
    run = function(opts)
      request("history", opts)
    end,
  },
  {
    name = "MLChatDelete",
    desc = "pick a saved chat to delete",
    run = function(opts)
      request("history_delete", opts)
    end,
  },
  {
    name = "MLEdit",
    nargs = "*",
    range = true,
    desc = "rewrite the range following {instruction}, as a diff to accept or reject",
    run = function(opts)
      local p = payload(opts, true)
      if vim.trim(p.args) ~= "" then
        require("ml-offload.rpc").request("edit", p)
        return
      end
      vim.ui.input({ prompt = "MLEdit instruction: " }, function(text)
        if text and vim.trim(text) ~= "" then
          p.args = text
          require("ml-offload.rpc").request("edit", p)
        end
      end)
    end,
  },
  {
    name = "MLAccept",
    desc = "apply the diff proposal (one undo step)",
    run = function()
      diff().accept()
    end,
  },
  {
    name = "MLReject",
    desc = "drop the diff proposal (and stop its generation)",
    run = function()
      diff().reject()
    end,
  },
  {
    name = "MLStatus",
    desc = "server, backend, model and VRAM",
    run = function(opts)
      request("status", opts)
    end,
  },
  {
    name = "MLEmbed",
    nargs = "*",
    range = true,
    desc = "embed [text], the range or the line",
    run = function(opts)
      request("embed", opts, true)
    end,
  },
  {
    name = "MLComplete",
    nargs = "?",
    complete = function()
      return { "on", "off", "toggle" }
    end,
    desc = "ghost text: on, off or toggle (no argument: say which)",
    run = function(opts)
      local complete = require("ml-offload.complete")
      local how = vim.trim(opts.args)
      if how == "" then
        local state = complete.is_enabled() and "on" or "off"
        require("ml-offload").notify("ghost text is " .. state)
      elseif how == "on" or how == "off" or how == "toggle" then
        complete.set(how)
      else
        require("ml-offload").notify(":MLComplete takes on, off or toggle", vim.log.levels.ERROR)
      end
    end,
  },
  {
    name = "MLModels",
    desc = "the models; <CR> picks one",
    run = function(opts)
      request("models", opts)
    end,
  },
}

function M.create()
  for _, c in ipairs(M.list) do
    vim.api.nvim_create_user_command(c.name, function(opts)
      c.run(opts)
    end, {
      nargs = c.nargs or 0,
      range = c.range or nil,
      complete = c.complete,
      desc = "ml-offload: " .. c.desc,
      force = true,
    })
  end
end

return M
