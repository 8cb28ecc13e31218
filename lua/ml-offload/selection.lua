--- What a command with a range is about: the selected text, exactly (a charwise or
--- blockwise Visual selection is not widened to whole lines), with its file, filetype and
--- line range; and where the user is (the source of a chat or an edit).
local M = {}

--- A buffer's name as the user knows it (relative to the cwd when inside it).
---@return string
function M.file_name(buf)
  local name = vim.api.nvim_buf_get_name(buf)
  if name == "" then
    return "[No Name]"
  end
  return vim.fn.fnamemodify(name, ":~:.")
end

--- The current window and buffer, and the cursor there.
function M.source()
  local buf = vim.api.nvim_get_current_buf()
  local win = vim.api.nvim_get_current_win()
  return {
    buf = buf,
    win = win,
    file = M.file_name(buf),
    filetype = vim.bo[buf].filetype,
    cursor = vim.api.nvim_win_get_cursor(win),
  }
end

--- The selection of a command called with lines `line1`..`line2` (`range` > 0). When these
--- are the last Visual selection's lines and it was charwise or blockwise, exactly the
--- selected characters; else the whole lines.
---@return table? { buf, file, filetype, first, last, text, lines, charwise, mode?, first_col?, last_col? }
function M.capture(line1, line2, range)
  if not range or range == 0 then
    return nil
  end
  local buf = vim.api.nvim_get_current_buf()
  local out = {
    buf = buf,
    file = M.file_name(buf),
    filetype = vim.bo[buf].filetype,
    first = line1,
    last = line2,
    charwise = false,
  }
  local mode = vim.fn.visualmode()
  local from, to = vim.fn.getpos("'<"), vim.fn.getpos("'>")
  local lines
  if (mode == "v" or mode == "\22") and from[2] == line1 and to[2] == line2 then
    lines = vim.fn.getregion(from, to, { type = mode })
    out.charwise = true
    out.mode = mode
    out.first_col, out.last_col = from[3], to[3]
  else
    lines = vim.api.nvim_buf_get_lines(buf, line1 - 1, line2, false)
  end
  out.text = table.concat(lines, "\n")
  out.lines = vim.api.nvim_buf_get_lines(buf, line1 - 1, line2, false) -- the whole lines
  return out
end

--- The payload of a command the remote plugin handles: its arguments, what it is about,
--- and where the user is.
function M.command_payload(opts)
  local chat = require("ml-offload.chat")
  local source = chat.here()
  local here = M.source()
  if source.buf == here.buf then
    source = here
  end
  return {
    args = opts.args or "",
    bang = opts.bang or false,
    range = opts.range or 0,
    line1 = opts.line1,
    line2 = opts.line2,
    selection = M.capture(opts.line1, opts.line2, opts.range),
    source = source,
  }
end

return M
