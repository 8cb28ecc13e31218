--- Floating windows: their geometry (kept inside the editor when it is resized, and never
--- exactly on top of another of ours), and the information floats of :MLStatus and :MLModels.
local M = {}
local H = {}

--- Open plugin floats: win -> { layout = function() -> win config }, kept for VimResized.
H.tracked = {}

--- The information floats, by kind: their title and their keys (action "close" closes,
--- any other is sent to the remote plugin with the buffer and the cursor's line).
M.kinds = {
  status = { title = "status", keys = { { "q", "close", "close" } } },
  models = {
    title = "models",
    keys = { { "<CR>", "select_model", "use the model under the cursor" }, { "q", "close", "close" } },
  },
}

local function config()
  return require("ml-offload.config").get().window
end

function M.has_border(border)
  return border ~= nil and border ~= "none" and border ~= "" and border ~= false
end

--- " prefix · part · part "
---@param parts? string[]
---@return string
function M.title(parts)
  local items = { config().title or "ml-offload" }
  for _, part in ipairs(parts or {}) do
    if part and part ~= "" then
      table.insert(items, part)
    end
  end
  return " " .. table.concat(items, " · ") .. " "
end

--- How many of our floats are open now: the next one is shifted by that many steps.
function M.open_count()
  local n = 0
  for win in pairs(H.tracked) do
    if vim.api.nvim_win_is_valid(win) then
      n = n + 1
    end
  end
  return n
end

--- A float's position and size for the editor's current size. `step` shifts it down and
--- right (2 lines, 4 columns per step) so that two floats never cover each other exactly.
---@param step? integer
---@return table
function M.geometry(step)
  local cfg = config()
  local pad = M.has_border(cfg.border) and 2 or 0
  local columns, lines = vim.o.columns, vim.o.lines - vim.o.cmdheight - 1
  local width = math.max(10, math.min(columns - pad, math.floor(columns * (cfg.width or 0.7))))
  local height = math.max(1, math.min(lines - pad, math.floor(lines * (cfg.height or 0.6))))
  local row = math.max(0, math.floor((lines - height - pad) / 2))
  local col = math.max(0, math.floor((columns - width - pad) / 2))
  step = step or 0
  row = math.max(0, math.min(row + 2 * step, lines - height - pad))
  col = math.max(0, math.min(col + 4 * step, columns - width - pad))
  return { relative = "editor", width = width, height = height, row = row, col = col }
end

--- Keep `win` laid out by `layout()` (a window config) when the editor is resized.
function M.track(win, layout)
  H.tracked[win] = { layout = layout }
  vim.api.nvim_create_autocmd("WinClosed", {
    group = H.group(),
    pattern = tostring(win),
    once = true,
    callback = function()
      H.tracked[win] = nil
    end,
  })
end

function M.relayout()
  for win, t in pairs(H.tracked) do
    if vim.api.nvim_win_is_valid(win) then
      pcall(vim.api.nvim_win_set_config, win, t.layout())
    else
      H.tracked[win] = nil
    end
  end
end

function H.group()
  if not H.augroup then
    H.augroup = vim.api.nvim_create_augroup("ml-offload-floats", { clear = true })
    vim.api.nvim_create_autocmd("VimResized", { group = H.augroup, callback = M.relayout })
  end
  return H.augroup
end

--- Window options every plugin float gets.
function M.style(win)
  require("ml-offload.highlights").setup()
  vim.wo[win].wrap = true
  vim.wo[win].linebreak = true
  vim.wo[win].conceallevel = 2
  vim.wo[win].winhighlight = require("ml-offload.highlights").float_winhighlight
end

--- Open a focused float on `buf`, tracked for resizing. `extra` adds to its config
--- (title, footer...).
---@return integer win
function M.open_win(buf, extra)
  local cfg = config()
  local step = M.open_count()
  local function layout()
    return M.geometry(step)
  end
  local opts = vim.tbl_extend("force", layout(), { style = "minimal", border = cfg.border or "rounded" }, extra or {})
  if not M.has_border(opts.border) then
    opts.title, opts.footer = nil, nil
  end
  local win = vim.api.nvim_open_win(buf, true, opts)
  M.style(win)
  M.track(win, layout)
  return win
end

--- An information float (read-only markdown) whose keys call back into the remote plugin.
--- spec: { kind = "status"|"models", lines = {...}, title = {parts}, cursor = line? }
---@return { buf: integer, win: integer }
function M.open_tracked(spec)
  local kind = M.kinds[spec.kind] or M.kinds.status
  local buf = vim.api.nvim_create_buf(false, true)
  vim.bo[buf].bufhidden = "wipe"
  vim.bo[buf].swapfile = false
  vim.bo[buf].undolevels = -1
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, spec.lines or {})
  vim.bo[buf].modifiable = false
  vim.bo[buf].filetype = "markdown"
  local parts = { kind.title }
  vim.list_extend(parts, spec.title or {})
  local hints = {}
  for _, key in ipairs(kind.keys) do
    table.insert(hints, key[1] .. " " .. key[3])
  end
  local win = M.open_win(buf, {
    title = M.title(parts),
    title_pos = "center",
    footer = " " .. table.concat(hints, " · ") .. " ",
    footer_pos = "right",
  })
  if spec.cursor then
    pcall(vim.api.nvim_win_set_cursor, win, { spec.cursor, 0 })
  end
  for _, key in ipairs(kind.keys) do
    local lhs, action, desc = key[1], key[2], key[3]
    local fn = function()
      if action == "close" then
        M.close_buf(buf)
      else
        require("ml-offload.rpc").request(action, { buf = buf, line = vim.api.nvim_win_get_cursor(0)[1] })
      end
    end
    vim.keymap.set("n", lhs, fn, { buffer = buf, nowait = true, silent = true, desc = "ml-offload: " .. desc })
  end
  vim.api.nvim_create_autocmd("BufWipeout", {
    buffer = buf,
    once = true,
    callback = function()
      require("ml-offload.rpc").request("float_closed", { buf = buf })
    end,
  })
  return { buf = buf, win = win }
end

function M.close_buf(buf)
  for _, win in ipairs(vim.fn.win_findbuf(buf)) do
    pcall(vim.api.nvim_win_close, win, true)
  end
  if vim.api.nvim_buf_is_valid(buf) then
    pcall(vim.api.nvim_buf_delete, buf, { force = true })
  end
end

--- Replace lines [first, last) (0-based, end-exclusive; -1 is the end) of a read-only float.
function M.set_lines(buf, first, last, lines)
  if not vim.api.nvim_buf_is_valid(buf) then
    return false
  end
  vim.bo[buf].modifiable = true
  local ok, err = pcall(vim.api.nvim_buf_set_lines, buf, first, last, false, lines)
  vim.bo[buf].modifiable = false
  if not ok then
    error(err, 0)
  end
  return true
end

return M
