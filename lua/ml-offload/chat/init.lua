--- Chat windows: a real markdown buffer per chat, shown in a float, a vertical split or a
--- tab; hidden and shown again; its keys, its title or winbar (state and key hints).
---
--- The conversation itself (what is sent, streaming, saving) is the remote plugin's
--- (python/mloffload/nvim/chat/); this module only owns the windows and the keys.
local M = {}
local H = {}

---@class MLOffloadChatSource
---@field buf integer The buffer the chat was opened from (#buffer, where code is applied)
---@field win integer Its window
---@field selection? table What was selected: { buf, file, filetype, first, last, text, ... }

---@class MLOffloadChat
---@field buf integer
---@field title string
---@field layout MLOffloadLayout
---@field source MLOffloadChatSource
---@field status { state?: string, level?: string, model?: string, where?: string }

---@type table<integer, MLOffloadChat>
H.chats = {}
H.last = nil ---@type integer?

--- What each chat key does, in the order `?` lists them.
M.actions = {
  {
    name = "send",
    mode = "n",
    desc = "send the message under the last ## You",
    fn = function(buf)
      M.send(buf)
    end,
  },
  {
    name = "send_insert",
    mode = { "i", "n" },
    desc = "send (insert mode too)",
    fn = function(buf)
      vim.cmd("stopinsert")
      M.send(buf)
    end,
  },
  {
    name = "stop",
    mode = "n",
    desc = "stop the answer in flight",
    fn = function(buf)
      require("ml-offload.rpc").request("chat_stop", { buf = buf })
    end,
  },
  {
    name = "hide",
    mode = "n",
    desc = "hide the chat (:MLChat shows it again)",
    fn = function(buf)
      M.hide(buf)
    end,
  },
  {
    name = "help",
    mode = "n",
    desc = "show these keys",
    fn = function(buf)
      M.help(buf)
    end,
  },
  {
    name = "yank",
    mode = "n",
    desc = "yank the code block under the cursor",
    fn = function(buf)
      require("ml-offload.chat.apply").yank(buf)
    end,
  },
  {
    name = "replace",
    mode = "n",
    desc = "replace the chat's selection with the code block (diff first)",
    fn = function(buf)
      require("ml-offload.chat.apply").replace(buf)
    end,
  },
  {
    name = "insert",
    mode = "n",
    desc = "insert the code block at the source window's cursor (diff first)",
    fn = function(buf)
      require("ml-offload.chat.apply").insert(buf)
    end,
  },
}

local function cfg()
  return require("ml-offload.config").get().chat
end

local function key_of(name)
  return require("ml-offload.config").keys((cfg().keymaps or {})[name])
end

--- The chat shown in `buf`, or nil.
---@return MLOffloadChat?
function M.get(buf)
  return H.chats[buf]
end

--- For the Python side: whether `buf` is a chat.
function M.find(buf)
  return H.chats[buf] ~= nil
end

--- The chat of the current window, or nil.
function M.current()
  local buf = vim.api.nvim_get_current_buf()
  return H.chats[buf] and buf or nil
end

--- The last chat opened or shown, if its buffer still exists.
function M.last()
  if H.last and H.chats[H.last] and vim.api.nvim_buf_is_valid(H.last) then
    return H.last
  end
  return nil
end

function M.list()
  return vim.tbl_keys(H.chats)
end

--- Where the user is now, as a chat's source. From inside a chat: that chat's source.
function M.here()
  local buf = vim.api.nvim_get_current_buf()
  local chat = H.chats[buf]
  if chat then
    return vim.deepcopy(chat.source)
  end
  return { buf = buf, win = vim.api.nvim_get_current_win() }
end

--- Open a chat on new lines (from the remote plugin).
--- spec: { lines, name?, title, layout?, source = {buf, win, selection?}, cursor?, insert? }
---@return { buf: integer, win: integer }
function M.open(spec)
  local buf = vim.api.nvim_create_buf(false, true)
  vim.bo[buf].buftype = "nofile"
  vim.bo[buf].bufhidden = "hide"
  vim.bo[buf].swapfile = false
  pcall(vim.api.nvim_buf_set_name, buf, spec.name or ("ml-offload://chat/" .. buf))
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, spec.lines or { "## You", "" })
  vim.bo[buf].filetype = "markdown"
  if vim.treesitter.language.add("markdown") then
    pcall(vim.treesitter.start, buf, "markdown")
  end
  local source = spec.source or M.here()
  H.chats[buf] = {
    buf = buf,
    title = spec.title or "new chat",
    layout = spec.layout or cfg().layout or "float",
    source = source,
    status = {},
  }
  H.keys(buf)
  H.autocmds(buf)
  local win = M.show(buf)
  local line = spec.cursor or vim.api.nvim_buf_line_count(buf)
  pcall(vim.api.nvim_win_set_cursor, win, { line, 0 })
  if spec.insert then
    vim.cmd("startinsert!")
  end
  return { buf = buf, win = win }
end

function H.keys(buf)
  for _, action in ipairs(M.actions) do
    for _, lhs in ipairs(key_of(action.name)) do
      vim.keymap.set(action.mode, lhs, function()
        action.fn(buf)
      end, { buffer = buf, nowait = true, silent = true, desc = "ml-offload: " .. action.desc })
    end
  end
end

function H.autocmds(buf)
  local group = vim.api.nvim_create_augroup("ml-offload-chat-" .. buf, { clear = true })
  vim.api.nvim_create_autocmd("BufWinEnter", {
    group = group,
    buffer = buf,
    callback = function()
      local win = vim.api.nvim_get_current_win()
      vim.schedule(function()
        require("ml-offload.chat.buffer").fold_context(buf, win)
      end)
    end,
  })
  vim.api.nvim_create_autocmd("BufHidden", {
    group = group,
    buffer = buf,
    callback = function()
      require("ml-offload.rpc").request(
        "chat_save",
        { buf = buf, lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false) }
      )
    end,
  })
  vim.api.nvim_create_autocmd("BufWipeout", {
    group = group,
    buffer = buf,
    callback = function()
      H.chats[buf] = nil
      pcall(vim.api.nvim_del_augroup_by_id, group)
      require("ml-offload.rpc").request("chat_closed", { buf = buf })
    end,
  })
end

--- The windows showing `buf` in the current tab.
local function windows_here(buf)
  local tab = vim.api.nvim_get_current_tabpage()
  return vim.tbl_filter(function(win)
    return vim.api.nvim_win_get_tabpage(win) == tab
  end, vim.fn.win_findbuf(buf))
end

--- Show a chat (focused), in its layout; focuses it if it is already shown in this tab.
--- `source` (optional) becomes its new source: #buffer and "apply" refer to it.
---@return integer win
function M.show(buf, source)
  local chat = H.chats[buf]
  if source and chat then
    chat.source = source
  end
  H.last = buf
  local win = windows_here(buf)[1]
  if win then
    vim.api.nvim_set_current_win(win)
    return win
  end
  local layout = chat and chat.layout or "float"
  if layout == "vsplit" then
    local width = math.max(20, math.floor(vim.o.columns * (cfg().split_width or 0.4)))
    win = vim.api.nvim_open_win(buf, true, { split = "right", win = -1, width = width })
  elseif layout == "tab" then
    vim.cmd("tab sbuffer " .. buf)
    win = vim.api.nvim_get_current_win()
  else
    win = require("ml-offload.float").open_win(buf, { title = " ml-offload ", title_pos = "center" })
    vim.wo[win].conceallevel = 0
  end
  vim.wo[win].wrap = true
  vim.wo[win].linebreak = true
  vim.wo[win].foldmethod = "manual"
  vim.wo[win].foldenable = true
  vim.wo[win].number = false
  vim.wo[win].relativenumber = false
  M.render(buf)
  require("ml-offload.chat.buffer").fold_context(buf, win)
  return win
end

--- Close the chat's windows; the buffer (and a running answer) stays.
function M.hide(buf)
  for _, win in ipairs(vim.fn.win_findbuf(buf)) do
    if not pcall(vim.api.nvim_win_close, win, false) then
      -- the last window of the last tab: keep the window, show another buffer in it
      vim.api.nvim_win_call(win, function()
        vim.cmd("enew")
      end)
    end
  end
end

--- Hide the last chat when it is shown in this tab; show it otherwise; with no chat yet,
--- open a new one.
function M.toggle()
  local buf = M.last()
  if buf == nil then
    require("ml-offload.rpc").request("chat", { source = M.here() })
    return
  end
  if #windows_here(buf) > 0 then
    M.hide(buf)
  else
    M.show(buf, M.here())
  end
end

--- :MLChat without a prompt or a range: the last chat again, else a new one.
function M.reopen_or_new()
  local buf = M.last()
  if buf then
    M.show(buf, M.here())
    local win = vim.api.nvim_get_current_win()
    vim.api.nvim_win_set_cursor(win, { vim.api.nvim_buf_line_count(buf), 0 })
    return
  end
  require("ml-offload.rpc").request("chat", { source = M.here() })
end

--- Ask the remote plugin to send the message under the last "## You".
function M.send(buf)
  buf = buf or M.current()
  if not buf then
    require("ml-offload").notify("not in a chat: :MLChat opens one", vim.log.levels.WARN)
    return
  end
  require("ml-offload.rpc").request("chat_send", { buf = buf, lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false) })
end

--- From the remote plugin: a chat's state (and model, and where it ran) for its title or
--- winbar. status: { title?, state?, level?, model?, where? }
function M.set_status(buf, status)
  local chat = H.chats[buf]
  if not chat then
    return
  end
  if status.title then
    chat.title = status.title
  end
  chat.status = vim.tbl_extend("force", chat.status, status)
  M.render(buf)
end

--- The key hints shown beside the state.
function M.hints()
  local out = {}
  for _, name in ipairs({ "send", "stop", "hide", "help" }) do
    local lhs = key_of(name)[1]
    if lhs then
      local words = { send = "send", stop = "stop", hide = "hide", help = "keys" }
      table.insert(out, lhs .. " " .. words[name])
    end
  end
  return table.concat(out, " · ")
end

local level_hl = { waiting = "MLOffloadWaiting", error = "MLOffloadError", done = "MLOffloadDone" }

--- Title and footer (float) or winbar (split, tab) from the chat's status.
function M.render(buf)
  local chat = H.chats[buf]
  if not chat then
    return
  end
  require("ml-offload.highlights").setup()
  local s = chat.status
  local parts = {}
  for _, part in ipairs({ chat.title or "", s.model or "", s.where or "", s.state or "" }) do
    if part ~= "" then
      table.insert(parts, part)
    end
  end
  local float = require("ml-offload.float")
  for _, win in ipairs(vim.fn.win_findbuf(buf)) do
    local wcfg = vim.api.nvim_win_get_config(win)
    if wcfg.relative and wcfg.relative ~= "" then
      if float.has_border(wcfg.border) then
        pcall(vim.api.nvim_win_set_config, win, {
          title = { { float.title(parts), level_hl[s.level] or "MLOffloadTitle" } },
          title_pos = "center",
          footer = { { " " .. M.hints() .. " ", "MLOffloadHint" } },
          footer_pos = "right",
        })
      end
    else
      local items = {}
      for _, p in ipairs(parts) do
        table.insert(items, (tostring(p):gsub("%%", "%%%%")))
      end
      vim.wo[win].winbar = string.format(
        "%%#%s# %s %%*%%=%%#MLOffloadHint#%s ",
        level_hl[s.level] or "MLOffloadTitle",
        table.concat(items, " · "),
        M.hints():gsub("%%", "%%%%")
      )
    end
  end
end

--- `?`: every chat key, in a small float (q or <Esc> closes it).
function M.help(buf)
  local lines = { "# ml-offload chat keys", "" }
  for _, action in ipairs(M.actions) do
    local lhs = table.concat(key_of(action.name), ", ")
    if lhs ~= "" then
      local modes = type(action.mode) == "table" and table.concat(action.mode, "/") or action.mode
      table.insert(lines, string.format("%-10s %-4s %s", lhs, modes, action.desc))
    end
  end
  vim.list_extend(lines, {
    "",
    "Commands: :MLChatSend  :MLChatToggle  :MLChatNew  :MLChatHistory  :MLChatDelete",
    "          :MLAccept  :MLReject (a diff proposal)",
    "In a message: #buffer  #buffers  #file:path  #diagnostics",
  })
  local hbuf = vim.api.nvim_create_buf(false, true)
  vim.bo[hbuf].bufhidden = "wipe"
  vim.api.nvim_buf_set_lines(hbuf, 0, -1, false, lines)
  vim.bo[hbuf].modifiable = false
  vim.bo[hbuf].filetype = "markdown"
  local float = require("ml-offload.float")
  local win = float.open_win(hbuf, { title = float.title({ "keys" }), title_pos = "center", zindex = 60 })
  for _, lhs in ipairs({ "q", "<Esc>", "?" }) do
    vim.keymap.set("n", lhs, function()
      pcall(vim.api.nvim_win_close, win, true)
    end, { buffer = hbuf, nowait = true, silent = true })
  end
  return { buf = hbuf, win = win, chat = buf }
end

--- From the remote plugin, when a chat was deleted from the history: close it.
function M.forget(buf)
  if H.chats[buf] and vim.api.nvim_buf_is_valid(buf) then
    H.chats[buf] = nil
    pcall(vim.api.nvim_buf_delete, buf, { force = true })
  end
  if H.last == buf then
    H.last = nil
  end
end

--- The chats shown as floats in the current tab (a diff proposal hides them meanwhile).
function M.floats_here()
  local out = {}
  for buf in pairs(H.chats) do
    for _, win in ipairs(windows_here(buf)) do
      local wcfg = vim.api.nvim_win_get_config(win)
      if wcfg.relative and wcfg.relative ~= "" then
        table.insert(out, buf)
      end
    end
  end
  return out
end

return M
