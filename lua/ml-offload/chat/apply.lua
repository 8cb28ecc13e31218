--- Applying an answer: the fenced code block under the cursor in a chat, yanked, or
--- proposed (as a diff, see ml-offload.diff) in place of the chat's selection or at the
--- source window's cursor.
local M = {}

local function notify(msg, level)
  require("ml-offload").notify(msg, level)
end

--- The fenced block around line `row` (1-based) of `lines`: { first, last, lines, lang } or
--- nil. The fence lines themselves count as inside.
function M.block_at(lines, row)
  local open
  for i, line in ipairs(lines) do
    if open == nil then
      local fence, lang = line:match("^(```+)%s*([%w_+.-]*)")
      if fence then
        open = { first = i, fence = fence, lang = lang }
      end
    elseif line == open.fence then
      if row >= open.first and row <= i then
        return { first = open.first, last = i, lines = vim.list_slice(lines, open.first + 1, i - 1), lang = open.lang }
      end
      open = nil
    end
    if i > row and open == nil then
      return nil
    end
  end
  return nil
end

local function block_here(buf)
  local win = vim.fn.bufwinid(buf)
  local row = win ~= -1 and vim.api.nvim_win_get_cursor(win)[1] or 1
  local block = M.block_at(vim.api.nvim_buf_get_lines(buf, 0, -1, false), row)
  if not block then
    notify("put the cursor on a code block (``` … ```) of an answer", vim.log.levels.WARN)
  end
  return block
end

--- Yank the block into `chat.register` (linewise).
function M.yank(buf)
  local block = block_here(buf)
  if not block then
    return false
  end
  local reg = require("ml-offload.config").get().chat.register or '"'
  vim.fn.setreg(reg, block.lines, "l")
  notify(string.format("yanked %d lines into register %s", #block.lines, reg))
  return true
end

local function chat_of(buf)
  return require("ml-offload.chat").get(buf)
end

--- The lines that replace a selection's lines: for a charwise selection, what stood
--- before and after it on its first and last lines stays.
function M.around_selection(sel, lines)
  if sel.mode ~= "v" or #lines == 0 then
    return lines
  end
  local orig = vim.api.nvim_buf_get_lines(sel.buf, sel.first - 1, sel.last, false)
  if #orig == 0 then
    return lines
  end
  local out = vim.deepcopy(lines)
  local last_line = orig[#orig]
  local last_col = math.min(sel.last_col, #last_line)
  local tail_from = last_col + 1 + (last_col > 0 and vim.str_utf_end(last_line, last_col) or 0)
  out[1] = orig[1]:sub(1, sel.first_col - 1) .. out[1]
  out[#out] = out[#out] .. last_line:sub(tail_from)
  return out
end

--- Propose the block in place of the selection the chat was opened about.
function M.replace(buf)
  local block = block_here(buf)
  if not block then
    return false
  end
  local chat = chat_of(buf)
  local sel = chat and chat.source and chat.source.selection
  if not sel or not vim.api.nvim_buf_is_valid(sel.buf) then
    notify(
      "this chat is not about a selection: open one from Visual mode, or insert the block instead",
      vim.log.levels.WARN
    )
    return false
  end
  return require("ml-offload.diff").open({
    source_buf = sel.buf,
    source_win = chat.source.win,
    first = sel.first,
    last = sel.last,
    lines = M.around_selection(sel, block.lines),
    title = string.format("replace lines %d–%d", sel.first, sel.last),
  })
end

--- Propose the block below the source window's cursor line.
function M.insert(buf)
  local block = block_here(buf)
  if not block then
    return false
  end
  local chat = chat_of(buf)
  local source = chat and chat.source
  if not source or not vim.api.nvim_buf_is_valid(source.buf) then
    notify("the buffer this chat was opened from is gone", vim.log.levels.WARN)
    return false
  end
  local row
  if source.win and vim.api.nvim_win_is_valid(source.win) and vim.api.nvim_win_get_buf(source.win) == source.buf then
    row = vim.api.nvim_win_get_cursor(source.win)[1]
  else
    row = vim.api.nvim_buf_get_mark(source.buf, '"')[1]
  end
  row = math.max(0, math.min(row, vim.api.nvim_buf_line_count(source.buf)))
  return require("ml-offload.diff").open({
    source_buf = source.buf,
    source_win = source.win,
    first = row + 1,
    last = row,
    lines = block.lines,
    title = string.format("insert below line %d", row),
  })
end

return M
