--- Floating windows: open, append streamed text at the buffer's end, retitle, close.
--- The Python side calls these through `nvim_exec_lua`; each call is one RPC round trip.
local M = {}

local function config()
  return require("ml-offload.config").get().window
end

local function has_border(border)
  return border ~= nil and border ~= "none" and border ~= "" and border ~= false
end

--- " prefix · part · part "
function M.title(parts)
  local items = { config().title or "ml-offload" }
  for _, part in ipairs(parts or {}) do
    if part and part ~= "" then
      table.insert(items, part)
    end
  end
  return " " .. table.concat(items, " · ") .. " "
end

local function geometry()
  local cfg = config()
  local columns, lines = vim.o.columns, vim.o.lines - vim.o.cmdheight - 1
  local width = math.max(20, math.min(columns - 2, math.floor(columns * (cfg.width or 0.7))))
  local height = math.max(3, math.min(lines - 2, math.floor(lines * (cfg.height or 0.6))))
  return {
    relative = "editor",
    width = width,
    height = height,
    row = math.max(0, math.floor((lines - height) / 2) - 1),
    col = math.max(0, math.floor((columns - width) / 2)),
  }
end

--- Open a focused, read-only float.
--- spec: { lines = {...}, title = {parts}, filetype = "markdown", keys = {{lhs, fn, desc}} }
--- Returns { buf = buf, win = win }.
function M.open(spec)
  local cfg = config()
  local buf = vim.api.nvim_create_buf(false, true)
  vim.bo[buf].bufhidden = "wipe"
  vim.bo[buf].swapfile = false
  vim.bo[buf].undolevels = -1
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, spec.lines or {})
  vim.bo[buf].modifiable = false
  vim.bo[buf].filetype = spec.filetype or "markdown"
  local win_opts = geometry()
  win_opts.style = "minimal"
  win_opts.border = cfg.border or "rounded"
  if has_border(win_opts.border) then
    win_opts.title = M.title(spec.title)
    win_opts.title_pos = "center"
  end
  local win = vim.api.nvim_open_win(buf, true, win_opts)
  vim.wo[win].wrap = true
  vim.wo[win].linebreak = true
  vim.wo[win].conceallevel = 2
  for _, key in ipairs(spec.keys or {}) do
    if key[1] and key[1] ~= false and key[1] ~= "" then
      vim.keymap.set("n", key[1], key[2], { buffer = buf, nowait = true, silent = true, desc = key[3] })
    end
  end
  return { buf = buf, win = win }
end

--- A float the Python side keeps track of: its keys call back into the remote plugin.
--- actions: {{lhs, action, desc}}; the buffer number is passed along as payload.buf.
function M.open_tracked(spec, actions)
  spec.keys = {}
  local handle = M.open(spec)
  local buf = handle.buf
  for _, a in ipairs(actions or {}) do
    local lhs, action, desc = a[1], a[2], a[3]
    if lhs and lhs ~= false and lhs ~= "" then
      local fn
      if action == "followup" then
        fn = function()
          require("ml-offload").ask("Follow-up: ", "followup", { buf = buf })
        end
      elseif action == "close" then
        fn = function()
          M.close_buf(buf)
        end
      else
        fn = function()
          require("ml-offload").call(action, { buf = buf, line = vim.api.nvim_win_get_cursor(0)[1] })
        end
      end
      vim.keymap.set("n", lhs, fn, { buffer = buf, nowait = true, silent = true, desc = "ml-offload: " .. desc })
    end
  end
  vim.api.nvim_create_autocmd("BufWipeout", {
    buffer = buf,
    once = true,
    callback = function()
      require("ml-offload").call("closed", { buf = buf })
    end,
  })
  return handle
end

function M.close_buf(buf)
  for _, win in ipairs(vim.fn.win_findbuf(buf)) do
    pcall(vim.api.nvim_win_close, win, true)
  end
  if vim.api.nvim_buf_is_valid(buf) then
    pcall(vim.api.nvim_buf_delete, buf, { force = true })
  end
end

local function edit(buf, fn)
  if not vim.api.nvim_buf_is_valid(buf) then
    return false
  end
  vim.bo[buf].modifiable = true
  local ok, err = pcall(fn)
  vim.bo[buf].modifiable = false
  if not ok then
    error(err, 0)
  end
  return true
end

--- Append text at the end of the buffer (never at the cursor). A window whose cursor sat
--- on the last line keeps following the end; any other cursor stays where the user put it.
function M.append(buf, text)
  if not vim.api.nvim_buf_is_valid(buf) then
    return false
  end
  local last = vim.api.nvim_buf_line_count(buf)
  local following = {}
  for _, win in ipairs(vim.fn.win_findbuf(buf)) do
    if vim.api.nvim_win_get_cursor(win)[1] == last then
      table.insert(following, win)
    end
  end
  edit(buf, function()
    local tail = vim.api.nvim_buf_get_lines(buf, last - 1, last, false)[1] or ""
    vim.api.nvim_buf_set_text(buf, last - 1, #tail, last - 1, #tail, vim.split(text, "\n", { plain = true }))
  end)
  local count = vim.api.nvim_buf_line_count(buf)
  for _, win in ipairs(following) do
    pcall(vim.api.nvim_win_set_cursor, win, { count, 0 })
  end
  return true
end

--- Replace lines [first, last) (0-based, end-exclusive; -1 is the end) with `lines`.
function M.set_lines(buf, first, last, lines)
  return edit(buf, function()
    vim.api.nvim_buf_set_lines(buf, first, last, false, lines)
  end)
end

function M.line_count(buf)
  if not vim.api.nvim_buf_is_valid(buf) then
    return -1
  end
  return vim.api.nvim_buf_line_count(buf)
end

function M.set_title(buf, parts)
  for _, win in ipairs(vim.fn.win_findbuf(buf)) do
    local cfg = vim.api.nvim_win_get_config(win)
    if cfg.relative and cfg.relative ~= "" and has_border(config().border) then
      pcall(vim.api.nvim_win_set_config, win, { title = M.title(parts), title_pos = "center" })
    end
  end
end

return M
