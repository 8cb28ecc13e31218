--- The statusline component: `require("ml-offload").statusline()`, for lualine or a plain
--- 'statusline'. For example `gemma-3-270m · 19/19 GPU · 1.2/80 GiB · 51 tok/s · ●`: the
--- model, its layers on the GPU (or "CPU"), VRAM used of total, the last measured decode
--- rate, and the completion state.
---
--- `get()` only formats what is cached, so a statusline redraw never waits. The facts come
--- from the answers the plugin already gets (completions, chats, edits) and from a low-rate
--- `/status` poll that runs only while something keeps calling `get()`. When the string
--- changes, `User MLOffloadStatus` fires (data: the fields below).
local M = {}

local uv = vim.uv or vim.loop

---@class MLOffloadStatusFields
---@field model? string
---@field gpu_layers? integer
---@field max_layers? integer
---@field vram_used? number GiB
---@field vram_total? number GiB
---@field tps? number Tokens per second of the last generation
---@field complete string "idle", "thinking", "off" or "fallback"
---@field server? string "up", "down" (nil: not known yet)
---@field busy integer Requests (chats, edits, completions) in flight

local H = {}
H.fields = { complete = "off", busy = 0 } ---@type MLOffloadStatusFields
H.text = nil ---@type string?
H.shown_at = 0 -- when get() was last called (uv.now(), ms)
H.timer = nil
H.polling = false
H.event_queued = false

function H.config()
  local c = require("ml-offload.config").get()
  return c.statusline or {}, c
end

function H.short(model)
  -- "gemma-3-270m-q4_k_m" -> "gemma-3-270m": the quantisation tag is noise in a statusline
  return (model:gsub("[-.]?[qQ]%d[%w_]*$", ""):gsub("[-.]?[fF]16$", ""))
end

function H.format(f)
  local opts = H.config()
  local icons = opts.icons or {}
  local parts = {}
  if f.server == "down" and f.complete ~= "fallback" then
    table.insert(parts, "server down")
  end
  if f.model then
    table.insert(parts, H.short(f.model))
    if f.gpu_layers ~= nil then
      if f.gpu_layers > 0 then
        table.insert(parts, string.format("%d/%d GPU", f.gpu_layers, f.max_layers or f.gpu_layers))
      else
        table.insert(parts, "CPU")
      end
    end
  end
  if f.vram_total and f.vram_total > 0 then
    table.insert(parts, string.format("%.1f/%.0f GiB", f.vram_used or 0, f.vram_total))
  end
  if f.tps and f.tps > 0 then
    table.insert(parts, string.format("%.0f tok/s", f.tps))
  end
  local state = f.complete
  if f.busy > 0 and state ~= "fallback" then
    state = "thinking" -- a chat or an edit is running
  end
  table.insert(parts, icons[state] or state)
  return table.concat(parts, opts.separator or " · ")
end

function H.changed()
  local text = H.format(H.fields)
  if text == H.text then
    return
  end
  H.text = text
  if H.event_queued then
    return
  end
  H.event_queued = true
  vim.schedule(function() -- never from inside a statusline redraw
    H.event_queued = false
    pcall(vim.api.nvim_exec_autocmds, "User", {
      pattern = "MLOffloadStatus",
      modeline = false,
      data = vim.deepcopy(H.fields),
    })
    pcall(vim.cmd.redrawstatus)
  end)
end

--- Merge facts in (nil values leave a field as it is; use vim.NIL to clear one).
---@param fields table
function M.update(fields)
  for k, v in pairs(fields) do
    if v == vim.NIL then
      H.fields[k] = nil
    else
      H.fields[k] = v
    end
  end
  H.changed()
end

--- A request started (+1) or ended (-1).
function M.busy(delta)
  H.fields.busy = math.max(0, H.fields.busy + delta)
  H.changed()
end

---@return MLOffloadStatusFields
function M.fields()
  return vim.deepcopy(H.fields)
end

--- `/status` as fields: the model loaded (the one we last used, else the first), its layers,
--- and the first GPU's memory.
function H.from_status(status)
  local out = { server = "up" }
  local loaded = type(status.loaded_models) == "table" and status.loaded_models or {}
  local pick = nil
  for _, m in ipairs(loaded) do
    if type(m) == "table" and (m.id == H.fields.model or pick == nil) then
      pick = m
    end
  end
  if pick then
    out.model = pick.id
    out.gpu_layers = tonumber(pick.n_gpu_layers)
    out.max_layers = tonumber(pick.max_layers)
  end
  local gpu = type(status.gpu) == "table" and status.gpu or {}
  local first = type(gpu.gpus) == "table" and gpu.gpus[1] or nil
  if type(first) == "table" then
    out.vram_used = tonumber(first.used_gb)
    out.vram_total = tonumber(first.total_gb)
  end
  return out
end

function H.poll()
  if H.polling then
    return
  end
  local opts, config = H.config()
  local interval = opts.poll_ms or 5000
  if uv.now() - H.shown_at > 2 * interval then
    -- nobody has asked for the string lately: stop until get() is called again
    if H.timer then
      H.timer:stop()
    end
    return
  end
  H.polling = true
  local headers = {}
  local key = config.api_key or vim.env.ML_OFFLOAD_API_KEY
  if key and key ~= "" then
    headers.Authorization = "Bearer " .. key
  end
  require("ml-offload.complete.http").request({
    url = config.api_url,
    method = "GET",
    path = "/status",
    headers = headers,
    timeout_ms = 3000,
  }, {
    on_done = function(status, body, err)
      H.polling = false
      if err and err.kind == "unreachable" then
        M.update({ server = "down" })
      elseif status == 200 and type(body) == "table" then
        M.update(H.from_status(body))
      end
    end,
  })
end

function H.ensure_timer()
  local interval = (H.config().poll_ms or 5000)
  if interval <= 0 then
    return
  end
  if not H.timer then
    H.timer = uv.new_timer()
  end
  if not H.timer:is_active() then
    H.timer:start(0, interval, vim.schedule_wrap(H.poll))
  end
end

--- The statusline string; cached, never blocks. Calling it keeps the `/status` poll alive.
---@return string
function M.get()
  H.shown_at = uv.now()
  if not H.timer or not H.timer:is_active() then
    pcall(H.ensure_timer)
  end
  if H.text == nil then
    H.text = H.format(H.fields)
  end
  return H.text
end

--- Follow the plugin's own requests (chats, edits): busy while they run, their rate after.
function M.setup()
  local group = vim.api.nvim_create_augroup("ml-offload-statusline", { clear = true })
  vim.api.nvim_create_autocmd("User", {
    group = group,
    pattern = "MLOffloadRequestStarted",
    callback = function(ev)
      local kind = ev.data and ev.data.kind
      if kind == "chat" or kind == "edit" then
        M.busy(1)
      end
    end,
  })
  vim.api.nvim_create_autocmd("User", {
    group = group,
    pattern = "MLOffloadRequestFinished",
    callback = function(ev)
      local d = ev.data or {}
      if d.kind ~= "chat" and d.kind ~= "edit" then
        return
      end
      H.fields.busy = math.max(0, H.fields.busy - 1)
      local update = {}
      if type(d.tokens_per_second) == "number" and d.tokens_per_second > 0 then
        update.tps = d.tokens_per_second
      end
      if type(d.served_by) == "string" and d.served_by ~= "" then
        update.model = d.served_by
      end
      M.update(update)
    end,
  })
end

return M
