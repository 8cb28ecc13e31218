--- Proposals: a change to a buffer shown first as Neovim's diff mode (the proposal against
--- the original, side by side in one tab). :MLAccept applies it in one undo step;
--- :MLReject drops it, and stops the generation still writing it.
---
--- A proposal's id is its buffer's number. The remote plugin opens the proposals of :MLEdit
--- and streams into them; applying a chat's code block opens one from here.
local M = {}
local H = {}

---@class MLOffloadProposal
---@field id integer The proposal buffer
---@field win integer Its window
---@field source_buf integer
---@field source_win integer
---@field first integer First line replaced (1-based)
---@field last integer Last line replaced; first - 1 for an insertion
---@field original string[] The lines replaced, as they were
---@field lines string[] The proposed lines
---@field state "streaming"|"ready"|"error"
---@field note string
---@field title string
---@field remote boolean A generation in the remote plugin writes it

---@type table<integer, MLOffloadProposal>
H.proposals = {}
H.order = {} -- ids, newest last

local function notify(msg, level)
  require("ml-offload").notify(msg, level)
end

local function is_float(win)
  local c = vim.api.nvim_win_get_config(win)
  return c.relative ~= nil and c.relative ~= ""
end

--- A normal window showing `buf`: `win` when it does (its tab becomes current), else one
--- in this tab, else one anywhere, else a new split here.
function H.window_for(buf, win)
  if win and vim.api.nvim_win_is_valid(win) and vim.api.nvim_win_get_buf(win) == buf and not is_float(win) then
    return win
  end
  local tab = vim.api.nvim_get_current_tabpage()
  local anywhere
  for _, w in ipairs(vim.fn.win_findbuf(buf)) do
    if not is_float(w) then
      if vim.api.nvim_win_get_tabpage(w) == tab then
        return w
      end
      anywhere = anywhere or w
    end
  end
  return anywhere or vim.api.nvim_open_win(buf, false, { split = "above", win = -1 })
end

--- Open a proposal to replace lines `first`..`last` of `source_buf` with `lines`.
--- spec: { source_buf, source_win?, first, last, lines, title?, streaming? }
---@return integer id
function M.open(spec)
  local src = spec.source_buf
  if not (src and vim.api.nvim_buf_is_valid(src)) then
    error("ml-offload: the buffer to change is gone", 0)
  end
  local src_win = H.window_for(src, spec.source_win)
  vim.api.nvim_set_current_win(src_win)
  local chat = require("ml-offload.chat")
  for _, buf in ipairs(chat.floats_here()) do
    chat.hide(buf) -- a chat float would cover the diff; :MLChat shows it again
  end
  local first, last = spec.first, spec.last
  local all = vim.api.nvim_buf_get_lines(src, 0, -1, false)
  local proposal = vim.list_slice(all, 1, first - 1)
  vim.list_extend(proposal, spec.lines or {})
  vim.list_extend(proposal, all, last + 1, #all)
  local buf = vim.api.nvim_create_buf(false, true)
  vim.bo[buf].bufhidden = "wipe"
  vim.bo[buf].swapfile = false
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, proposal)
  pcall(vim.api.nvim_buf_set_name, buf, "ml-offload://proposal/" .. buf)
  vim.bo[buf].filetype = vim.bo[src].filetype
  local win = vim.api.nvim_open_win(buf, true, { split = "right", win = src_win })
  for _, w in ipairs({ src_win, win }) do
    vim.api.nvim_win_call(w, function()
      vim.cmd("diffthis")
    end)
  end
  pcall(vim.api.nvim_win_set_cursor, win, { math.max(1, math.min(first, #proposal)), 0 })
  local p = {
    id = buf,
    win = win,
    source_buf = src,
    source_win = src_win,
    first = first,
    last = last,
    original = vim.list_slice(all, first, last),
    lines = vim.deepcopy(spec.lines or {}),
    state = spec.streaming and "streaming" or "ready",
    note = spec.streaming and "writing…" or "",
    title = spec.title or "proposal",
    remote = spec.streaming or false,
  }
  H.proposals[buf] = p
  table.insert(H.order, buf)
  H.keys(p)
  vim.api.nvim_create_autocmd("BufWipeout", {
    buffer = buf,
    once = true,
    callback = function()
      if H.proposals[buf] then
        H.close(p, false)
      end
    end,
  })
  H.render(p)
  return buf
end

function H.keys(p)
  local keys = require("ml-offload.config").get().diff.keymaps or {}
  local cfg = require("ml-offload.config")
  for _, lhs in ipairs(cfg.keys(keys.accept)) do
    vim.keymap.set("n", lhs, function()
      M.accept(p.id)
    end, { buffer = p.id, nowait = true, silent = true, desc = "ml-offload: accept the proposal" })
  end
  for _, lhs in ipairs(cfg.keys(keys.reject)) do
    vim.keymap.set("n", lhs, function()
      M.reject(p.id)
    end, { buffer = p.id, nowait = true, silent = true, desc = "ml-offload: reject the proposal" })
  end
end

function H.hints()
  local cfg = require("ml-offload.config")
  local keys = cfg.get().diff.keymaps or {}
  local accept = table.concat(cfg.keys(keys.accept), "/")
  local reject = table.concat(cfg.keys(keys.reject), "/")
  return string.format("%s :MLAccept · %s :MLReject", accept, reject)
end

local state_hl = { streaming = "MLOffloadWaiting", ready = "MLOffloadDone", error = "MLOffloadError" }

function H.render(p)
  if not vim.api.nvim_win_is_valid(p.win) then
    return
  end
  require("ml-offload.highlights").setup()
  local what = p.note ~= "" and p.note or p.state
  local text = string.format("ml-offload · %s · %s", p.title, what):gsub("%%", "%%%%")
  vim.wo[p.win].winbar = string.format(
    "%%#%s# %s %%*%%=%%#MLOffloadHint#%s ",
    state_hl[p.state] or "MLOffloadTitle",
    text,
    (H.hints():gsub("%%", "%%%%"))
  )
end

--- From the remote plugin: the proposed lines so far (they replace the previous ones).
function M.update(id, lines)
  local p = H.proposals[id]
  if not p or not vim.api.nvim_buf_is_valid(id) then
    return false
  end
  local first = p.first - 1
  vim.api.nvim_buf_set_lines(id, first, first + #p.lines, false, lines)
  p.lines = lines
  return true
end

--- From the remote plugin: "ready" (generation done), or "error" with what happened.
function M.set_status(id, state, note)
  local p = H.proposals[id]
  if not p then
    return false
  end
  p.state = state
  p.note = note or ""
  H.render(p)
  if state == "ready" and vim.api.nvim_win_is_valid(p.win) then
    vim.api.nvim_win_call(p.win, function()
      vim.cmd("diffupdate")
    end)
  end
  return true
end

--- The proposal meant: `id`, else the one whose window (or source window) is current,
--- else the newest in this tab, else the newest.
---@return MLOffloadProposal?
function H.pick(id)
  if id then
    return H.proposals[id]
  end
  local win = vim.api.nvim_get_current_win()
  local tab = vim.api.nvim_get_current_tabpage()
  local in_tab
  for i = #H.order, 1, -1 do
    local p = H.proposals[H.order[i]]
    if p then
      if p.win == win or p.source_win == win then
        return p
      end
      if not in_tab and vim.api.nvim_win_is_valid(p.win) and vim.api.nvim_win_get_tabpage(p.win) == tab then
        in_tab = p
      end
    end
  end
  if in_tab then
    return in_tab
  end
  for i = #H.order, 1, -1 do
    if H.proposals[H.order[i]] then
      return H.proposals[H.order[i]]
    end
  end
  return nil
end

function H.close(p, accepted)
  H.proposals[p.id] = nil
  H.order = vim.tbl_filter(function(id)
    return id ~= p.id
  end, H.order)
  if vim.api.nvim_win_is_valid(p.source_win) then
    vim.api.nvim_win_call(p.source_win, function()
      vim.cmd("diffoff")
    end)
  end
  if vim.api.nvim_win_is_valid(p.win) then
    pcall(vim.api.nvim_win_close, p.win, true)
  end
  if vim.api.nvim_buf_is_valid(p.id) then
    pcall(vim.api.nvim_buf_delete, p.id, { force = true })
  end
  if vim.api.nvim_win_is_valid(p.source_win) then
    vim.api.nvim_set_current_win(p.source_win)
    if accepted then
      local line = math.max(1, math.min(p.first, vim.api.nvim_buf_line_count(p.source_buf)))
      pcall(vim.api.nvim_win_set_cursor, p.source_win, { line, 0 })
    end
  end
  if p.remote then
    require("ml-offload.rpc").request("proposal_closed", { id = p.id, accepted = accepted })
  end
end

--- The proposal meant, or a warning that there is none to `verb`.
function H.need(id, verb)
  local p = H.pick(id)
  if not p then
    notify("no proposal to " .. verb, vim.log.levels.WARN)
  end
  return p
end

--- :MLAccept — apply the proposal (one undo step), close the diff.
function M.accept(id)
  local p = H.need(id, "accept")
  if not p then
    return false
  end
  if p.state == "streaming" then
    notify("the proposal is still being written: wait for it, or :MLReject", vim.log.levels.WARN)
    return false
  end
  if p.state == "error" then
    notify("this proposal failed (" .. p.note .. "): :MLReject closes it", vim.log.levels.WARN)
    return false
  end
  if not vim.api.nvim_buf_is_valid(p.source_buf) then
    notify("the buffer to change is gone", vim.log.levels.ERROR)
    H.close(p, false)
    return false
  end
  local now = vim.api.nvim_buf_get_lines(p.source_buf, p.first - 1, p.last, false)
  if not vim.deep_equal(now, p.original) then
    notify("those lines changed since the proposal was made: :MLReject, then ask again", vim.log.levels.ERROR)
    return false
  end
  vim.api.nvim_buf_set_lines(p.source_buf, p.first - 1, p.last, false, p.lines)
  H.close(p, true)
  local last = p.first + #p.lines - 1
  notify(
    string.format(
      "applied to %s, lines %d–%d (u undoes it)",
      require("ml-offload.selection").file_name(p.source_buf),
      p.first,
      math.max(p.first, last)
    )
  )
  return true
end

--- :MLReject — drop the proposal (and stop its generation); the buffer stays as it was.
function M.reject(id)
  local p = H.need(id, "reject")
  if not p then
    return false
  end
  H.close(p, false)
  return true
end

--- The open proposals (for tests and statuslines): id -> state.
function M.list()
  local out = {}
  for id, p in pairs(H.proposals) do
    out[id] = { state = p.state, source_buf = p.source_buf, first = p.first, last = p.last, note = p.note }
  end
  return out
end

return M
