--- Ghost text: code completion at the cursor in insert mode, from the server's /infill.
---
--- After a pause in typing (`debounce_ms`) the text around the cursor goes to /infill (see
--- complete/context.lua); the answer streams in and is drawn as ghost text (complete/ghost.lua).
--- A keystroke cancels the request in flight: its socket is closed and the server stops
--- generating. Typing what the suggestion says keeps it, without a new request; moving the
--- cursor or leaving insert mode hides it. When the server cannot be reached, the remote
--- plugin completes with its in-process fallback model (python/mloffload/nvim/complete.py).
local M = {}

local uv = vim.uv or vim.loop
local ghost = require("ml-offload.complete.ghost")
local context = require("ml-offload.complete.context")

local H = {}
H.enabled = nil -- nil: the `enabled` option; :MLComplete on|off sets it
H.req = nil -- the request in flight
H.sugg = nil -- the suggestion shown
H.timer = nil -- the debounce
H.cache = {} -- context key -> suggestion text
H.cache_keys = {}
H.ids = 0
H.ring = nil
H.last_pick_row = {} -- buf -> row where far chunks were last picked
H.fim_off = nil -- { reason, until } after the server said no FIM model
H.notified = {} -- message -> when it was last shown
H.changed_at = 0 -- hrtime of the last keystroke seen (TextChangedI)
H.stats = {
  requests = 0,
  cancelled = 0,
  shown = 0,
  accepted = 0,
  kept = 0,
  cached = 0,
  errors = 0,
  fallback = 0,
  latencies = {}, -- ms from the keystroke to the first ghost text, newest last
}

H.CACHE_SIZE = 256 -- suggestions remembered by their context
H.MAX_LATENCIES = 2000

function H.opts()
  return require("ml-offload.config").get().complete
end

function H.status(fields)
  require("ml-offload.statusline").update(fields)
end

function H.notify_once(message, level)
  local now = uv.now()
  if H.notified[message] and now - H.notified[message] < 60000 then
    return
  end
  H.notified[message] = now
  require("ml-offload").notify(message, level or vim.log.levels.WARN)
end

-- --- on or off -------------------------------------------------------------------------

---@return boolean
function M.is_enabled()
  if H.enabled ~= nil then
    return H.enabled
  end
  return H.opts().enabled
end

--- Whether ghost text may show in `buf`: enabled, a normal modifiable buffer, its filetype
--- allowed (`filetypes`), and not switched off there (`vim.b.mloffload_complete = false`).
---@param buf? integer
---@return boolean
function M.allowed(buf)
  buf = buf or vim.api.nvim_get_current_buf()
  if not M.is_enabled() or not vim.api.nvim_buf_is_valid(buf) then
    return false
  end
  if vim.b[buf].mloffload_complete == false then
    return false
  end
  local bo = vim.bo[buf]
  if bo.buftype ~= "" or not bo.modifiable or bo.readonly then
    return false
  end
  local fts = H.opts().filetypes or {}
  local ft = bo.filetype
  local rule = fts[ft]
  if rule == nil then
    rule = fts["*"]
  end
  return rule ~= false
end

---@param how "on"|"off"|"toggle"
function M.set(how)
  if how == "toggle" then
    H.enabled = not M.is_enabled()
  else
    H.enabled = how == "on"
  end
  if H.enabled then
    H.fim_off = nil
    H.status({ complete = "idle" })
  else
    M.dismiss()
    H.cancel()
    H.status({ complete = "off" })
  end
end

-- --- the request -----------------------------------------------------------------------

function H.schedule()
  if not H.timer then
    H.timer = uv.new_timer()
  end
  H.timer:stop()
  H.timer:start(H.opts().debounce_ms, 0, vim.schedule_wrap(H.request))
end

function H.cancel()
  if H.timer then
    H.timer:stop()
  end
  local req = H.req
  H.req = nil
  if req == nil or req.done then
    return
  end
  req.done = true
  H.stats.cancelled = H.stats.cancelled + 1
  if req.handle then
    req.handle:cancel()
  elseif req.python then
    require("ml-offload.rpc").request("complete_cancel", { id = req.id })
  end
  if M.is_enabled() then
    H.status({ complete = req.backend == "fallback" and "fallback" or "idle" })
  end
end

function H.cursor()
  local pos = vim.api.nvim_win_get_cursor(0)
  return pos[1] - 1, pos[2]
end

function H.remember(key, text)
  if H.cache[key] == nil then
    table.insert(H.cache_keys, key)
    if #H.cache_keys > H.CACHE_SIZE then
      H.cache[table.remove(H.cache_keys, 1)] = nil
    end
  end
  H.cache[key] = text
end

--- Chunks from the current file away from the cursor, when it moved far since the last pick.
function H.pick_far(buf, row, ctx)
  local last = H.last_pick_row[buf]
  if last and math.abs(last - row) <= 32 then
    return
  end
  H.last_pick_row[buf] = row
  local n = H.ring.chunk_lines
  if ctx.first > 0 then
    local from = math.max(0, ctx.first - n)
    local lines = vim.api.nvim_buf_get_lines(buf, from, ctx.first, false)
    H.ring:add(context.filename(buf), lines, buf, from)
  end
  local lines = vim.api.nvim_buf_get_lines(buf, ctx.last + 1, ctx.last + 1 + n, false)
  H.ring:add(context.filename(buf), lines, buf, ctx.last + 1)
end

function H.body(ctx, extra)
  local o = H.opts()
  local body = vim.deepcopy(o.params or {})
  body.input_prefix = ctx.input_prefix
  body.input_suffix = ctx.input_suffix
  body.prompt = ctx.prompt
  body.input_extra = extra
  body.n_predict = o.n_predict
  body.n_indent = ctx.n_indent
  body.t_max_predict_ms = o.t_max_predict_ms
  body.cache_prompt = true
  body.stream = true
  body.model = o.model
  -- The final event carries only what the statusline and the cache need.
  body.response_fields = { "stop", "model", "tokens_predicted", "timings/predicted_per_second", "truncated" }
  return body
end

function H.request()
  local buf = vim.api.nvim_get_current_buf()
  local mode = vim.api.nvim_get_mode().mode
  if mode:sub(1, 1) ~= "i" or not M.allowed(buf) or vim.fn.pumvisible() == 1 then
    return
  end
  if H.fim_off and uv.now() < H.fim_off["until"] then
    return
  end
  H.cancel()
  local o = H.opts()
  local row, col = H.cursor()
  local ctx = context.local_context(buf, row, col, o)
  local line = vim.api.nvim_buf_get_lines(buf, row, row + 1, false)[1] or ""
  H.ids = H.ids + 1
  local req = {
    id = H.ids,
    buf = buf,
    row = row,
    col = col,
    line = line,
    text = "",
    key = ctx.input_prefix .. "\1" .. ctx.prompt .. "\1" .. ctx.input_suffix,
    changed_at = H.changed_at,
    backend = "server",
    next_lines = vim.api.nvim_buf_get_lines(buf, row + 1, row + 4, false),
  }
  local cached = H.cache[req.key]
  if cached then
    H.stats.cached = H.stats.cached + 1
    req.done = true
    req.text = cached
    H.present(req)
    return
  end
  H.ring = H.ring or context.ring(o.ring_chunks, o.ring_chunk_lines)
  H.pick_far(buf, row, ctx)
  req.body = H.body(ctx, H.ring:extra(buf, ctx.first, ctx.last, o.ring_tokens))
  H.req = req
  H.stats.requests = H.stats.requests + 1
  H.status({ complete = "thinking" })
  if o.transport == "python" then
    H.send_python(req)
  else
    H.send_http(req)
  end
end

function H.headers()
  local c = require("ml-offload.config").get()
  local key = c.api_key or vim.env.ML_OFFLOAD_API_KEY
  if key and key ~= "" then
    return { Authorization = "Bearer " .. key }
  end
  return {}
end

function H.send_http(req)
  local c = require("ml-offload.config").get()
  req.handle = require("ml-offload.complete.http").request({
    url = c.api_url,
    path = "/infill",
    body = req.body,
    headers = H.headers(),
    stream = true,
    timeout_ms = c.timeout,
    transport = H.opts().transport,
  }, {
    on_event = function(ev)
      H.on_event(req, ev)
    end,
    on_done = function(status, body, err)
      H.on_done(req, status, body, err)
    end,
  })
end

--- Through the remote plugin: the fallback model when the server is down (or every request,
--- with transport = "python").
function H.send_python(req)
  req.handle = nil
  req.python = true
  require("ml-offload.rpc").request("complete", { id = req.id, body = req.body })
end

function H.on_event(req, ev)
  if req ~= H.req or type(ev) ~= "table" then
    return
  end
  if ev.error then
    H.on_done(req, 500, ev, nil)
    return
  end
  if type(ev.content) == "string" and ev.content ~= "" then
    req.text = req.text .. ev.content
    H.present(req)
  end
  if ev.stop == true then
    req.final = ev
  end
end

function H.on_done(req, status, body, err)
  if req.finished then
    return
  end
  req.finished = true
  local current = req == H.req
  if current then
    H.req = nil
    req.done = true
  end
  if err then
    if err.kind == "unreachable" and current and not req.python then
      local c = require("ml-offload.config").get()
      H.status({ server = "down" })
      if c.fallback then
        req.finished = false
        req.backend = "fallback"
        H.req = req
        req.done = false
        H.stats.fallback = H.stats.fallback + 1
        H.status({ complete = "fallback" })
        H.send_python(req)
        return
      end
    end
    if current and err.kind ~= "cancelled" then
      H.stats.errors = H.stats.errors + 1
      H.status({ complete = M.is_enabled() and "idle" or "off" })
    end
    return
  end
  if status ~= 200 then
    H.stats.errors = H.stats.errors + 1
    local e = type(body) == "table" and type(body.error) == "table" and body.error or {}
    local message = type(e.message) == "string" and e.message or ("HTTP " .. tostring(status))
    if e.code == "fim_unsupported" then
      H.fim_off = { reason = message, ["until"] = uv.now() + 60000 }
      H.status({ complete = "off" })
      H.notify_once("ghost text is off: " .. message .. " (:help ml-offload-complete)")
    else
      if req.backend == "fallback" then -- nothing can complete now: pause, do not retry per key
        H.fim_off = { reason = message, ["until"] = uv.now() + 10000 }
      end
      H.status({ complete = "idle" })
      H.notify_once("completion failed: " .. message)
    end
    return
  end
  local final = req.final or {}
  local update = { server = req.backend == "fallback" and "down" or "up" }
  update.complete = req.backend == "fallback" and "fallback" or "idle"
  if type(final.model) == "string" then
    update.model = final.model
  end
  local tps = final["timings/predicted_per_second"]
  if type(tps) == "number" and tps > 0 then
    update.tps = tps
  end
  H.status(update)
  H.remember(req.key, req.text)
end

--- Lua export `complete_update`: what the remote plugin says about request `id`: more
--- `text`, or that it is `done` (with `tps` and `model`), or an `error` (with its `code`);
--- `backend` is "server" or "fallback".
---@param id integer
---@param update table
function M.on_python(id, update)
  local req = H.req
  if req == nil or req.id ~= id or type(update) ~= "table" then
    return
  end
  if update.backend == "fallback" then
    req.backend = "fallback"
  end
  if type(update.text) == "string" and update.text ~= "" then
    req.text = req.text .. update.text
    H.present(req)
  end
  if update.error then
    H.on_done(req, 400, { error = { message = update.error, code = update.code } }, nil)
  elseif update.done then
    req.final = { model = update.model, ["timings/predicted_per_second"] = update.tps }
    H.on_done(req, 200, nil, nil)
  end
end

-- --- showing it --------------------------------------------------------------------------

function H.present(req)
  local buf = vim.api.nvim_get_current_buf()
  if buf ~= req.buf or vim.api.nvim_get_mode().mode:sub(1, 1) ~= "i" then
    return
  end
  local s = H.sugg
  if s == nil or s.req ~= req then
    local row, col = H.cursor()
    local line = vim.api.nvim_get_current_line()
    if row ~= req.row or col ~= req.col or line ~= req.line then
      return
    end
    s = { req = req, buf = buf, row = row, col = col, before = line:sub(1, col), after = line:sub(col + 1) }
    s.consumed = 0
    H.sugg = s
  end
  local text = ghost.tidy(req.text, req.line:sub(req.col + 1), req.next_lines)
  s.text = text:sub(s.consumed + 1)
  if s.text == "" then
    ghost.clear(buf)
    return
  end
  if not s.shown then
    s.shown = true
    require("ml-offload.highlights").setup()
    H.stats.shown = H.stats.shown + 1
    if req.changed_at > 0 then
      table.insert(H.stats.latencies, (uv.hrtime() - req.changed_at) / 1e6)
      if #H.stats.latencies > H.MAX_LATENCIES then
        table.remove(H.stats.latencies, 1)
      end
    end
  end
  ghost.show(buf, s.row, s.col, s.text)
end

--- Hide the suggestion (the request, if any, goes on).
function M.dismiss()
  local s = H.sugg
  H.sugg = nil
  if s then
    ghost.clear(s.buf)
  end
end

--- After the cursor moved or the text changed: true when the suggestion still stands, the
--- user having typed (part of) it; it then shows what is left.
function H.follow()
  local s = H.sugg
  if s == nil then
    return false
  end
  if vim.api.nvim_get_current_buf() ~= s.buf then
    return false
  end
  local row, col = H.cursor()
  if row ~= s.row or col < s.col then
    return false
  end
  local line = vim.api.nvim_get_current_line()
  local typed = line:sub(s.col + 1, col)
  if line:sub(1, s.col) ~= s.before or line:sub(col + 1) ~= s.after or s.text:sub(1, #typed) ~= typed then
    return false
  end
  if typed == "" then
    return true
  end
  s.consumed = s.consumed + #typed
  s.text = s.text:sub(#typed + 1)
  s.col = col
  s.before = line:sub(1, col)
  H.stats.kept = H.stats.kept + 1
  if s.text == "" then
    M.dismiss()
    return false
  end
  ghost.show(s.buf, s.row, s.col, s.text)
  return true
end

function H.on_change()
  H.changed_at = uv.hrtime()
  if H.follow() then
    return
  end
  M.dismiss()
  H.cancel()
  if M.allowed() then
    H.schedule()
  end
end

-- --- accepting -----------------------------------------------------------------------------

--- Take the suggestion, or part of it: "all", its first "line" or its first "word". What is
--- left stays shown. Returns false when there was nothing to take.
---@param kind? "all"|"line"|"word"
---@return boolean
function M.accept(kind)
  local s = H.sugg
  if s == nil or s.text == "" or vim.api.nvim_get_current_buf() ~= s.buf then
    return false
  end
  local part = ghost.part(s.text, kind or "all")
  local lines = vim.split(part, "\n", { plain = true })
  local row, col = s.row, s.col
  local end_row = row + #lines - 1
  local end_col = #lines == 1 and (col + #lines[1]) or #lines[#lines]
  vim.api.nvim_buf_set_text(s.buf, row, col, row, col, lines)
  H.stats.accepted = H.stats.accepted + 1
  s.consumed = s.consumed + #part
  s.text = s.text:sub(#part + 1)
  s.row, s.col = end_row, end_col
  local line = vim.api.nvim_buf_get_lines(s.buf, end_row, end_row + 1, false)[1] or ""
  s.before, s.after = line:sub(1, end_col), line:sub(end_col + 1)
  vim.api.nvim_win_set_cursor(0, { end_row + 1, end_col })
  if s.text == "" then
    M.dismiss()
  else
    ghost.show(s.buf, s.row, s.col, s.text)
  end
  return true
end

--- Ask now, without waiting for the pause.
function M.trigger()
  H.changed_at = uv.hrtime()
  M.dismiss()
  H.request()
end

--- What is shown, for tests and statuslines: nil, or { text, row, col } (0-based).
---@return { text: string, row: integer, col: integer }?
function M.current()
  local s = H.sugg
  if s == nil or s.text == "" then
    return nil
  end
  return { text = s.text, row = s.row, col = s.col }
end

--- Counters since startup (requests, cancelled, shown, accepted, kept, cached, errors,
--- fallback) and the latencies from keystroke to ghost text (ms).
function M.stats()
  local out = vim.deepcopy(H.stats)
  out.in_flight = H.req ~= nil
  out.ring = H.ring and #H.ring.chunks or 0
  return out
end

--- The expression behind the accept keys: take the suggestion when one shows, else what
--- the key does without us (the completion menu's next/previous item, or the key itself).
function H.expr(kind, lhs, pum)
  return function()
    if H.sugg ~= nil and H.sugg.text ~= "" then
      return string.format("<Cmd>lua require('ml-offload.complete').accept(%q)<CR>", kind)
    end
    if pum and vim.fn.pumvisible() == 1 then
      return pum
    end
    return lhs
  end
end

H.mapped = {}

function H.map_keys(keys)
  for _, lhs in ipairs(H.mapped) do
    pcall(vim.keymap.del, "i", lhs)
  end
  H.mapped = {}
  local config = require("ml-offload.config")
  local specs = {
    { "accept", "all", "<C-n>" },
    { "accept_line", "line", "<C-p>" },
    { "accept_word", "word", nil },
  }
  for _, spec in ipairs(specs) do
    for _, lhs in ipairs(config.keys(keys[spec[1]])) do
      vim.keymap.set("i", lhs, H.expr(spec[2], lhs, spec[3]), {
        expr = true,
        replace_keycodes = true,
        silent = true,
        desc = "ml-offload: " .. spec[1]:gsub("_", " ") .. " the suggestion",
      })
      table.insert(H.mapped, lhs)
    end
  end
  for name, plug in pairs({ dismiss = "<Plug>(MLCompleteDismiss)", trigger = "<Plug>(MLCompleteTrigger)" }) do
    for _, lhs in ipairs(config.keys(keys[name])) do
      vim.keymap.set("i", lhs, plug, { remap = true, silent = true, desc = "ml-offload: " .. name })
      table.insert(H.mapped, lhs)
    end
  end
end

-- --- the ring's sources --------------------------------------------------------------------

function H.ring_add_around(buf)
  local o = H.opts()
  if o.ring_chunks <= 0 or not vim.api.nvim_buf_is_valid(buf) then
    return
  end
  H.ring = H.ring or context.ring(o.ring_chunks, o.ring_chunk_lines)
  local win = vim.fn.bufwinid(buf)
  local row = win ~= -1 and (vim.api.nvim_win_get_cursor(win)[1] - 1) or 0
  H.ring:add_around(buf, row)
end

function H.on_yank()
  local ev = vim.v.event
  if ev.operator ~= "y" or H.opts().ring_chunks <= 0 then
    return
  end
  local o = H.opts()
  H.ring = H.ring or context.ring(o.ring_chunks, o.ring_chunk_lines)
  H.ring:add(context.filename(0), ev.regcontents or {}, nil, nil)
end

--- Autocommands and keys; called by require("ml-offload").setup(). Safe to call again.
function M.setup()
  local o = H.opts()
  H.ring = context.ring(o.ring_chunks, o.ring_chunk_lines)
  H.status({ complete = M.is_enabled() and "idle" or "off" })
  local group = vim.api.nvim_create_augroup("ml-offload-complete", { clear = true })
  local function au(events, fn, pattern)
    vim.api.nvim_create_autocmd(events, { group = group, pattern = pattern, callback = fn })
  end
  au("InsertEnter", function()
    H.changed_at = uv.hrtime()
    if M.allowed() then
      H.schedule()
    end
  end)
  au({ "TextChangedI", "CursorMovedI" }, H.on_change)
  au({ "InsertLeave", "CompleteChanged" }, function(ev)
    M.dismiss()
    H.cancel()
    if ev.event == "InsertLeave" then
      H.ring_add_around(ev.buf)
    end
  end)
  au({ "BufEnter", "BufLeave", "BufWritePost" }, function(ev)
    if ev.event ~= "BufWritePost" then
      M.dismiss()
    end
    H.ring_add_around(ev.buf)
  end)
  au("TextYankPost", H.on_yank)
  au("BufWipeout", function(ev)
    context.forget(ev.buf)
    H.last_pick_row[ev.buf] = nil
  end)
  H.map_keys(o.keymaps or {})
end

return M
