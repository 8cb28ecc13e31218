--- Ghost text: a suggestion drawn as extmarks at the cursor (its first line inline, the rest
--- as virtual lines below), and the parts of it that a key accepts.
local M = {}

M.ns = vim.api.nvim_create_namespace("ml-offload-complete")
M.group = "MLOffloadGhost"

--- Draw `text` at (row, col) of `buf` (0-based); clears what was drawn before.
---@param buf integer
---@param row integer
---@param col integer
---@param text string
function M.show(buf, row, col, text)
  vim.api.nvim_buf_clear_namespace(buf, M.ns, 0, -1)
  if text == "" then
    return
  end
  local lines = vim.split(text, "\n", { plain = true })
  local opts = { hl_mode = "combine", priority = 200 }
  if lines[1] ~= "" then
    opts.virt_text = { { lines[1], M.group } }
    opts.virt_text_pos = "inline"
  end
  if #lines > 1 then
    local virt = {}
    for i = 2, #lines do
      table.insert(virt, { { lines[i], M.group } })
    end
    opts.virt_lines = virt
  end
  pcall(vim.api.nvim_buf_set_extmark, buf, M.ns, row, col, opts)
end

---@param buf integer
function M.clear(buf)
  if vim.api.nvim_buf_is_valid(buf) then
    vim.api.nvim_buf_clear_namespace(buf, M.ns, 0, -1)
  end
end

--- What the model wrote, made fit to show: no trailing blank lines, nothing when it only
--- repeats the text after the cursor or the lines that follow.
---@param text string
---@param after string The rest of the cursor line
---@param next_lines string[] The lines below the cursor line
---@return string
function M.tidy(text, after, next_lines)
  repeat -- trailing blank lines
    local before = text
    text = text:gsub("\n[ \t]*$", "")
  until text == before
  if text:match("^%s*$") then
    return ""
  end
  local lines = vim.split(text, "\n", { plain = true })
  if #lines == 1 and lines[1] == after then
    return ""
  end
  if lines[1] == "" and #lines > 1 then
    local same = true
    for i = 2, #lines do
      if lines[i] ~= next_lines[i - 1] then
        same = false
        break
      end
    end
    if same then
      return ""
    end
  end
  return text
end

--- The part of `text` one key takes: "all" of it, up to the end of its first "line"
--- (taking the newline first when it starts with one), or its first "word".
---@param text string
---@param kind "all"|"line"|"word"
---@return string
function M.part(text, kind)
  if kind == "all" then
    return text
  end
  if kind == "line" then
    local first = text:match("^\n[^\n]*") or text:match("^[^\n]*")
    return first ~= "" and first or text:sub(1, 1)
  end
  return text:match("^%s*[%w_]+") or text:match("^%s*[^%w_%s]+") or text:match("^%s+") or text:sub(1, 1)
end

return M
