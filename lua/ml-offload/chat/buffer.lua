--- The text of a chat buffer, as the remote plugin changes it: an answer's place (an
--- extmark the streamed text is inserted at), the following of the stream, and the folds
--- over attached context. Never at the cursor: every change is at the answer's mark.
local M = {}
local H = {}

M.ns = vim.api.nvim_create_namespace("ml-offload-chat-stream")
H.marks = {} -- buf -> extmark id of the answer streaming now

M.context_heading = "^### Context: "

---@return string[]
function M.lines(buf)
  if not vim.api.nvim_buf_is_valid(buf) then
    return {}
  end
  return vim.api.nvim_buf_get_lines(buf, 0, -1, false)
end

--- Start an answer: after the buffer's text (trailing blank lines dropped) add `before`
--- (attached context, notes), the answer's heading, the place the answer streams into,
--- and a new "## You" for the next message. Windows showing the chat move to its end.
--- spec: { before = {lines}, heading = "## model (ml-offload)" }
function M.answer_start(buf, spec)
  if not vim.api.nvim_buf_is_valid(buf) then
    return false
  end
  local count = vim.api.nvim_buf_line_count(buf)
  local keep = count
  while keep > 0 and vim.api.nvim_buf_get_lines(buf, keep - 1, keep, false)[1]:match("^%s*$") do
    keep = keep - 1
  end
  local lines = vim.list_extend({}, spec.before or {})
  local stream_row = keep + #lines + 3
  vim.list_extend(lines, { "", spec.heading, "", "", "", "## You", "", "" })
  vim.api.nvim_buf_set_lines(buf, keep, count, false, lines)
  H.marks[buf] = vim.api.nvim_buf_set_extmark(buf, M.ns, stream_row, 0, {})
  local last = vim.api.nvim_buf_line_count(buf)
  for _, win in ipairs(vim.fn.win_findbuf(buf)) do
    vim.api.nvim_win_set_cursor(win, { last, 0 })
  end
  if spec.before and #spec.before > 0 then
    M.refold(buf)
  end
  return true
end

--- Insert streamed text at the answer's place. A window whose cursor is on that line
--- moves along with it; one below it (the next message's line) is carried by the insert;
--- one above it (the user scrolled up) stays where it is.
function M.stream(buf, text)
  local mark = H.marks[buf]
  if mark == nil or not vim.api.nvim_buf_is_valid(buf) then
    return false
  end
  local pos = vim.api.nvim_buf_get_extmark_by_id(buf, M.ns, mark, {})
  local row, col = pos[1], pos[2]
  local on_line = {}
  for _, win in ipairs(vim.fn.win_findbuf(buf)) do
    if vim.api.nvim_win_get_cursor(win)[1] - 1 == row then
      table.insert(on_line, win)
    end
  end
  vim.api.nvim_buf_set_text(buf, row, col, row, col, vim.split(text, "\n", { plain = true }))
  local now = vim.api.nvim_buf_get_extmark_by_id(buf, M.ns, mark, {})
  for _, win in ipairs(on_line) do
    pcall(vim.api.nvim_win_set_cursor, win, { now[1] + 1, now[2] })
  end
  return true
end

--- The answer is over: `text` (the usage line, or why it stopped) goes at its place,
--- which is then forgotten.
function M.answer_end(buf, text)
  local ok = M.stream(buf, text)
  local mark = H.marks[buf]
  H.marks[buf] = nil
  if mark and vim.api.nvim_buf_is_valid(buf) then
    pcall(vim.api.nvim_buf_del_extmark, buf, M.ns, mark)
  end
  return ok
end

--- The attached context sections of `lines`: { {first, last}, ... } (1-based, inclusive):
--- a "### Context: " heading through the end of the fenced block that follows it.
function M.context_ranges(lines)
  local out = {}
  local i = 1
  while i <= #lines do
    if lines[i]:match(M.context_heading) then
      local first, fence = i, (lines[i + 1] or ""):match("^(```+)")
      local last = i
      if fence then
        last = #lines
        for j = i + 2, #lines do
          if lines[j] == fence then
            last = j
            break
          end
        end
      end
      table.insert(out, { first, last })
      i = last + 1
    else
      i = i + 1
    end
  end
  return out
end

--- Fold each attached context section in `win` (closed): shown, but out of the way.
function M.fold_context(buf, win)
  if not (vim.api.nvim_win_is_valid(win) and vim.api.nvim_buf_is_valid(buf)) then
    return
  end
  if vim.api.nvim_win_get_buf(win) ~= buf then
    return
  end
  local ranges = M.context_ranges(M.lines(buf))
  vim.api.nvim_win_call(win, function()
    vim.wo.foldmethod = "manual"
    vim.wo.foldenable = true
    pcall(vim.cmd, "silent! normal! zE")
    for _, r in ipairs(ranges) do
      if r[2] > r[1] then
        pcall(vim.cmd, string.format("silent %d,%dfold", r[1], r[2]))
      end
    end
  end)
end

function M.refold(buf)
  for _, win in ipairs(vim.fn.win_findbuf(buf)) do
    M.fold_context(buf, win)
  end
end

return M
