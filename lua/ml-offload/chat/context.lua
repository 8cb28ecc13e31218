--- What `#buffer`, `#buffers`, `#file:path` and `#diagnostics` in a message stand for: the
--- remote plugin names them (it parses the message), this gathers their text. It decides
--- nothing about size: the remote plugin fits them into the model's context.
local M = {}

M.max_file_bytes = 1024 * 1024 -- larger files are refused, not read

local selection = require("ml-offload.selection")

local function buffer_item(ref, buf)
  local lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false)
  return {
    ref = ref,
    file = selection.file_name(buf),
    filetype = vim.bo[buf].filetype,
    first = 1,
    last = #lines,
    text = table.concat(lines, "\n"),
  }
end

local function is_plain(buf)
  local empty = vim.api.nvim_buf_get_name(buf) == ""
    and vim.api.nvim_buf_line_count(buf) == 1
    and vim.api.nvim_buf_get_lines(buf, 0, 1, false)[1] == ""
  return vim.api.nvim_buf_is_loaded(buf)
    and vim.bo[buf].buflisted
    and vim.bo[buf].buftype == ""
    and not empty
    and not require("ml-offload.chat").find(buf)
end

local function file_item(ref, path)
  local full = vim.fn.fnamemodify(vim.fn.expand(path), ":p")
  local buf = vim.fn.bufnr(full)
  if buf > 0 and vim.api.nvim_buf_is_loaded(buf) then
    return buffer_item(ref, buf)
  end
  local stat = vim.uv.fs_stat(full)
  if not stat or stat.type ~= "file" then
    return { ref = ref, error = "no such file: " .. path }
  end
  if stat.size > M.max_file_bytes then
    return { ref = ref, error = string.format("%s is %d bytes, more than %d", path, stat.size, M.max_file_bytes) }
  end
  local ok, lines = pcall(vim.fn.readfile, full)
  if not ok then
    return { ref = ref, error = "cannot read " .. path }
  end
  return {
    ref = ref,
    file = vim.fn.fnamemodify(full, ":~:."),
    filetype = vim.filetype.match({ filename = full }) or "",
    first = 1,
    last = #lines,
    text = table.concat(lines, "\n"),
  }
end

local severity = { "ERROR", "WARN", "INFO", "HINT" }

local function diagnostics_item(ref, buf)
  local rows = {}
  for _, d in ipairs(vim.diagnostic.get(buf)) do
    table.insert(
      rows,
      string.format(
        "%s:%d:%d: %s: %s%s",
        selection.file_name(buf),
        d.lnum + 1,
        d.col + 1,
        severity[d.severity] or "?",
        ((d.message or ""):gsub("\n", " ")),
        d.source and (" [" .. d.source .. "]") or ""
      )
    )
  end
  return {
    ref = ref,
    file = selection.file_name(buf),
    filetype = "",
    text = #rows > 0 and table.concat(rows, "\n") or "(no diagnostics)",
    count = #rows,
  }
end

--- refs: { { kind = "buffer"|"buffers"|"file"|"diagnostics", arg = "...", ref = "#..." } }
--- Returns a list of items { ref, file, filetype, first, last, text } or { ref, error }.
function M.gather(chat_buf, refs)
  local chat = require("ml-offload.chat").get(chat_buf)
  local source = chat and chat.source and chat.source.buf
  local out = {}
  for _, r in ipairs(refs) do
    local valid = source and vim.api.nvim_buf_is_valid(source)
    if r.kind == "buffer" then
      table.insert(
        out,
        valid and buffer_item(r.ref, source) or { ref = r.ref, error = "the chat has no source buffer" }
      )
    elseif r.kind == "buffers" then
      for _, buf in ipairs(vim.api.nvim_list_bufs()) do
        if is_plain(buf) then
          table.insert(out, buffer_item(r.ref, buf))
        end
      end
    elseif r.kind == "file" then
      table.insert(out, file_item(r.ref, r.arg or ""))
    elseif r.kind == "diagnostics" then
      table.insert(
        out,
        valid and diagnostics_item(r.ref, source) or { ref = r.ref, error = "the chat has no source buffer" }
      )
    end
  end
  return out
end

return M
