--- What a completion request says about the code: the local context around the cursor, and a
--- ring of chunks from other places (buffers entered, edited, yanked or written) sent as
--- /infill's `input_extra`.
---
--- Both are built to keep the server's prompt cache useful. The request's prompt is
--- [extra chunks][prefix][line before the cursor][suffix]; the server reuses the longest
--- prefix it evaluated last time. So the extra chunks change only when the ring does, the
--- prefix starts on the same line for as long as it fits the budget (typing a new line does
--- not move its start), and the cursor's own line goes last, as /infill's `prompt`.
local M = {}

local H = {}
H.starts = {} -- buf -> first line of the last prefix (sticky)

--- A token estimate that errs high for code (about 3.5 characters a token): text sized by it
--- stays within the server's own limits, so the server never trims it (and the cache holds).
---@param text string
---@return integer
function M.tokens(text)
  return math.ceil(#text / 3)
end

---@class MLOffloadLocalContext
---@field input_prefix string Whole lines above the cursor, each ending in "\n"
---@field prompt string The cursor line up to the cursor
---@field input_suffix string The rest of the cursor line, "\n", and lines below
---@field n_indent integer The cursor line's indentation (0 on a blank line)
---@field first integer 0-based first line of the prefix
---@field last integer 0-based last line of the suffix

--- The context at (row, col) (0-based row, byte col), bounded by `budget`
--- ({ prefix_tokens, suffix_tokens }).
---@param buf integer
---@param row integer
---@param col integer
---@param budget { prefix_tokens: integer, suffix_tokens: integer }
---@return MLOffloadLocalContext
function M.local_context(buf, row, col, budget)
  local line = vim.api.nvim_buf_get_lines(buf, row, row + 1, false)[1] or ""
  local before, after = line:sub(1, col), line:sub(col + 1)
  local n_indent = #(before:match("^%s*") or "")
  if line:match("^%s*$") then
    n_indent = 0
  end

  -- Prefix: from the sticky start if it still fits, else as far up as 3/4 of the budget goes
  -- (so that the next lines typed fit without moving the start).
  local start = H.starts[buf]
  local text
  if start and start <= row then
    text = table.concat(vim.api.nvim_buf_get_lines(buf, start, row, false), "\n")
    if M.tokens(text) > budget.prefix_tokens then
      start = nil
    end
  else
    start = nil
  end
  if not start then
    local room = math.floor(budget.prefix_tokens * 0.75)
    start = row
    local used = 0
    local from = math.max(0, row - 400)
    local lines = vim.api.nvim_buf_get_lines(buf, from, row, false)
    for i = #lines, 1, -1 do
      local cost = M.tokens(lines[i] .. "\n")
      if used + cost > room then
        break
      end
      used = used + cost
      start = from + i - 1
    end
    H.starts[buf] = start
  end
  local above = vim.api.nvim_buf_get_lines(buf, start, row, false)
  local prefix = #above > 0 and (table.concat(above, "\n") .. "\n") or ""

  -- Suffix: the rest of the line, then lines below while the budget lasts. The server counts
  -- the cursor line's start (the prompt) and two FIM tokens against the suffix's share.
  local suffix_parts = { after }
  local used = M.tokens(after) + M.tokens(before) + 2
  local last = row
  local below = vim.api.nvim_buf_get_lines(buf, row + 1, row + 1 + 200, false)
  for _, l in ipairs(below) do
    local cost = M.tokens(l .. "\n")
    if used + cost > budget.suffix_tokens then
      break
    end
    used = used + cost
    table.insert(suffix_parts, l)
    last = last + 1
  end
  return {
    input_prefix = prefix,
    prompt = before,
    input_suffix = table.concat(suffix_parts, "\n") .. "\n",
    n_indent = n_indent,
    first = start,
    last = last,
  }
end

--- Forget a buffer's sticky prefix start (it was wiped).
function M.forget(buf)
  H.starts[buf] = nil
end

-- --- the ring of chunks ---------------------------------------------------------------

---@class MLOffloadChunk
---@field filename string
---@field text string
---@field lines string[]
---@field set table<string, boolean> its lines, for the similarity test
---@field buf? integer where it came from (nil: a yank)
---@field first? integer 0-based line range in that buffer
---@field last? integer
---@field tokens integer

local Ring = {}
Ring.__index = Ring

--- A ring of at most `size` chunks of at most `chunk_lines` lines each.
function M.ring(size, chunk_lines)
  return setmetatable({ size = size, chunk_lines = chunk_lines, chunks = {}, version = 0 }, Ring)
end

local function similarity(a, b)
  local common = 0
  for line in pairs(a.set) do
    if b.set[line] then
      common = common + 1
    end
  end
  local na, nb = vim.tbl_count(a.set), vim.tbl_count(b.set)
  return (na + nb) > 0 and (2 * common / (na + nb)) or 1
end

--- Add the chunk `lines` (from `buf` at 0-based `first`, or a yank when buf is nil). Short
--- chunks (under 3 lines) are not worth their tokens; a chunk much like one in the ring
--- replaces it (the newest goes last, as the server cuts the oldest first when short of
--- room).
---@return boolean added
function Ring:add(filename, lines, buf, first)
  if self.size <= 0 then
    return false
  end
  local kept = {}
  for _, l in ipairs(lines) do
    table.insert(kept, l)
  end
  while #kept > 0 and kept[#kept]:match("^%s*$") do
    table.remove(kept)
  end
  local nonblank = 0
  for _, l in ipairs(kept) do
    if not l:match("^%s*$") then
      nonblank = nonblank + 1
    end
  end
  if nonblank < 3 then
    return false
  end
  if #kept > self.chunk_lines then
    kept = vim.list_slice(kept, 1, self.chunk_lines)
  end
  local set = {}
  for _, l in ipairs(kept) do
    local t = vim.trim(l)
    if t ~= "" then
      set[t] = true
    end
  end
  local text = table.concat(kept, "\n") .. "\n"
  local chunk = {
    filename = filename ~= "" and filename or "tmp",
    text = text,
    lines = kept,
    set = set,
    buf = buf,
    first = first,
    last = first and (first + #kept - 1) or nil,
    tokens = M.tokens(text) + M.tokens(filename) + 2,
  }
  for i = #self.chunks, 1, -1 do
    local other = self.chunks[i]
    if other.text == text then
      return false
    end
    if similarity(other, chunk) > 0.9 then
      table.remove(self.chunks, i)
    end
  end
  table.insert(self.chunks, chunk)
  while #self.chunks > self.size do
    table.remove(self.chunks, 1)
  end
  self.version = self.version + 1
  return true
end

--- A chunk of the ring's size around `row` of `buf` (entering, leaving or writing it).
function Ring:add_around(buf, row)
  if not vim.api.nvim_buf_is_valid(buf) or vim.bo[buf].buftype ~= "" then
    return false
  end
  local half = math.floor(self.chunk_lines / 2)
  local first = math.max(0, row - half)
  local lines = vim.api.nvim_buf_get_lines(buf, first, first + self.chunk_lines, false)
  return self:add(M.filename(buf), lines, buf, first)
end

--- The chunks as `input_extra`, oldest first, within `max_tokens`, leaving out those that
--- overlap the local context of `buf` [first, last] (already in the prompt).
---@return { filename: string, text: string }[]
function Ring:extra(buf, first, last, max_tokens)
  local out, used = {}, 0
  for i = #self.chunks, 1, -1 do
    local c = self.chunks[i]
    local overlaps = c.buf == buf and c.first ~= nil and c.first <= last and c.last >= first
    if not overlaps then
      if used + c.tokens > max_tokens then
        break
      end
      used = used + c.tokens
      table.insert(out, 1, { filename = c.filename, text = c.text })
    end
  end
  return out
end

--- A buffer's name as a chunk's filename: relative to the working directory when inside it.
function M.filename(buf)
  local name = vim.api.nvim_buf_get_name(buf)
  if name == "" then
    return "tmp"
  end
  return vim.fn.fnamemodify(name, ":.")
end

return M
