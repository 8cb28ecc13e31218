--- A small HTTP/1.1 client on libuv (vim.uv) for ghost text: one request per connection,
--- JSON bodies, server-sent events read as they arrive, cancelled by closing the socket.
---
--- Why not the Python host or curl: a completion is latency-bound. Over vim.uv a request is a
--- socket write from the editor's own loop, with no process to spawn (curl) and no RPC hop
--- into a Python thread and back (the remote plugin); closing the socket tells the server at
--- once that the client is gone, and it stops generating. bench/complete.py measures all
--- three. `transport = "curl"` is there for https URLs, which this client does not speak.
---
--- Every callback given here runs on the main loop (vim.schedule), never in a fast event.
local M = {}

local uv = vim.uv or vim.loop

local H = {}
H.resolved = {} -- host -> address, once looked up

---@class MLOffloadHttpSpec
---@field url string Base URL ("http://127.0.0.1:9000")
---@field method? string "POST" (default) or "GET"
---@field path string
---@field body? table|string JSON-encoded when a table
---@field headers? table<string, string>
---@field stream? boolean The answer is server-sent events
---@field timeout_ms? integer Longest silence allowed once connected (default 30000)
---@field connect_timeout_ms? integer (default 1000)
---@field transport? "uv"|"curl"

---@class MLOffloadHttpHandlers
---@field on_event? fun(data: any) One decoded `data:` event of a stream
---@field on_done fun(status: integer?, body: any, err: { kind: string, message: string }?)
---   Once, at the end: the status and the decoded body (non-streamed, or an error answer),
---   or `err` (kind "unreachable", "timeout", "broken" or "cancelled").

--- "http://host:port/base" -> { host, port, base, tls }
---@param url string
---@return { host: string, port: integer, base: string, tls: boolean }?
function M.parse_url(url)
  local scheme, rest = url:match("^(https?)://(.+)$")
  if not scheme then
    return nil
  end
  local hostport, base = rest:match("^([^/]+)(.*)$")
  if not hostport then
    return nil
  end
  local host, port = hostport:match("^%[(.+)%]:?(%d*)$")
  if not host then
    host, port = hostport:match("^([^:]+):?(%d*)$")
  end
  if not host then
    return nil
  end
  local default = scheme == "https" and 443 or 80
  return {
    host = host,
    port = tonumber(port) or default,
    base = (base or ""):gsub("/+$", ""),
    tls = scheme == "https",
  }
end

--- The response parser: status line, headers, then a body that is chunked, sized or read to
--- the end; stream bodies are cut into SSE events.
function H.parser(stream, decoded)
  local p = { buf = "", status = nil, headers = {}, body = {}, chunked = false, events = {} }
  local sse = ""
  local chunk_left = nil -- bytes left in the current chunk; nil: a size line is next

  local function body_data(data)
    if not stream or (p.status and p.status >= 300) then
      table.insert(p.body, data)
      return
    end
    sse = sse .. data
    while true do
      local s, e = sse:find("\r?\n\r?\n")
      if not s then
        break
      end
      local block = sse:sub(1, s - 1)
      sse = sse:sub(e + 1)
      for line in (block .. "\n"):gmatch("(.-)\r?\n") do
        local payload = line:match("^data:%s?(.*)$")
        if payload and payload ~= "" and payload ~= "[DONE]" then
          local ok, value = pcall(vim.json.decode, payload)
          if ok then
            table.insert(p.events, value)
          end
        end
      end
    end
  end

  -- Chunked transfer: a size line, that many bytes, CRLF; a size of 0 ends the body.
  local function dechunk()
    while true do
      if chunk_left == nil then
        local s, e = p.buf:find("\r\n")
        if not s then
          return
        end
        local size = tonumber(p.buf:sub(1, s - 1):match("^%x+") or "", 16)
        p.buf = p.buf:sub(e + 1)
        if size == nil then
          p.failed = "a bad chunk size"
          return
        end
        if size == 0 then
          p.finished = true
          return
        end
        chunk_left = size
      end
      if chunk_left > 0 then
        if #p.buf == 0 then
          return
        end
        local take = math.min(chunk_left, #p.buf)
        body_data(p.buf:sub(1, take))
        p.buf = p.buf:sub(take + 1)
        chunk_left = chunk_left - take
      end
      if chunk_left == 0 then
        if #p.buf < 2 then
          return
        end
        p.buf = p.buf:sub(3)
        chunk_left = nil
      end
    end
  end

  --- Feed bytes; returns nothing (read p.events, p.finished, p.failed).
  function p.feed(data)
    p.buf = p.buf .. data
    if not p.status then
      local s, e = p.buf:find("\r\n\r\n")
      if not s then
        return
      end
      local head = p.buf:sub(1, s - 1)
      p.buf = p.buf:sub(e + 1)
      local first = true
      for line in (head .. "\r\n"):gmatch("(.-)\r\n") do
        if first then
          p.status = tonumber(line:match("^HTTP/%d[%.%d]* (%d%d%d)"))
          first = false
        else
          local k, v = line:match("^([^:]+):%s*(.*)$")
          if k then
            p.headers[k:lower()] = v
          end
        end
      end
      if not p.status then
        p.failed = "not an HTTP answer"
        return
      end
      p.chunked = not decoded and (p.headers["transfer-encoding"] or ""):lower():find("chunked") ~= nil
      p.length = not decoded and tonumber(p.headers["content-length"] or "") or nil
      p.got = 0
    end
    if p.chunked then
      dechunk()
    elseif #p.buf > 0 then
      p.got = p.got + #p.buf
      body_data(p.buf)
      p.buf = ""
      if p.length and p.got >= p.length then
        p.finished = true
      end
    end
  end

  --- The whole non-streamed body, decoded when it is JSON.
  function p.result()
    local text = table.concat(p.body)
    local ok, value = pcall(vim.json.decode, text)
    return ok and value or text
  end

  function p.take_events()
    local out = p.events
    p.events = {}
    return out
  end

  return p
end

function H.request_bytes(spec, target, body)
  local lines = {
    string.format("%s %s%s HTTP/1.1", spec.method or "POST", target.base, spec.path),
    "Host: " .. target.host .. ":" .. target.port,
    "Connection: close",
    "Accept: " .. (spec.stream and "text/event-stream" or "application/json"),
  }
  if body then
    table.insert(lines, "Content-Type: application/json")
    table.insert(lines, "Content-Length: " .. #body)
  end
  for k, v in pairs(spec.headers or {}) do
    table.insert(lines, k .. ": " .. v)
  end
  return table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or "")
end

--- A request in flight; `cancel()` closes it (no callback follows, but on_done with
--- kind "cancelled" when `notify` is true).
---@class MLOffloadHttpRequest
---@field cancel fun(self: MLOffloadHttpRequest)
---@field done boolean

---@param spec MLOffloadHttpSpec
---@param handlers MLOffloadHttpHandlers
---@return MLOffloadHttpRequest
function M.request(spec, handlers)
  local body = spec.body
  if type(body) == "table" then
    body = vim.json.encode(body)
  end
  if spec.transport == "curl" then
    return H.curl(spec, body, handlers)
  end
  local req = { done = false }
  local target = M.parse_url(spec.url)
  local tcp, timer
  local parser = H.parser(spec.stream, false)
  local scheduled = false

  local function stop()
    if timer and not timer:is_closing() then
      timer:stop()
      timer:close()
    end
    if tcp and not tcp:is_closing() then
      tcp:read_stop()
      tcp:close()
    end
  end

  local function finish(status, result, err)
    if req.done then
      return
    end
    req.done = true
    stop()
    vim.schedule(function()
      if handlers.on_event then
        for _, ev in ipairs(parser.take_events()) do
          handlers.on_event(ev)
        end
      end
      handlers.on_done(status, result, err)
    end)
  end

  local function flush_events()
    if scheduled or not handlers.on_event then
      return
    end
    scheduled = true
    vim.schedule(function()
      scheduled = false
      if req.cancelled then
        return
      end
      for _, ev in ipairs(parser.take_events()) do
        handlers.on_event(ev)
      end
    end)
  end

  local function arm(ms, kind, message)
    if timer and not timer:is_closing() then
      timer:stop()
      timer:start(ms, 0, function()
        finish(nil, nil, { kind = kind, message = message })
      end)
    end
  end

  function req.cancel()
    if req.done then
      return
    end
    req.cancelled = true
    req.done = true
    stop()
  end

  if not target or target.tls then
    vim.schedule(function()
      handlers.on_done(nil, nil, { kind = "unreachable", message = "not an http:// URL: " .. spec.url })
    end)
    req.done = true
    return req
  end

  local timeout = spec.timeout_ms or 30000
  local function on_read(err, chunk)
    if req.done then
      return
    end
    if err then
      finish(parser.status, nil, { kind = "broken", message = tostring(err) })
      return
    end
    arm(timeout, "timeout", "the server went silent")
    if chunk == nil then -- the server closed the connection
      if parser.status and (parser.finished or not parser.chunked) then
        finish(parser.status, parser.result())
      else
        finish(parser.status, nil, { kind = "broken", message = "the connection closed mid-answer" })
      end
      return
    end
    parser.feed(chunk)
    if parser.failed then
      finish(parser.status, nil, { kind = "broken", message = parser.failed })
    elseif parser.finished then
      finish(parser.status, parser.result())
    elseif #parser.events > 0 then
      flush_events()
    end
  end

  local function connect(address)
    if req.done then
      return
    end
    tcp = uv.new_tcp()
    timer = uv.new_timer()
    arm(spec.connect_timeout_ms or 1000, "unreachable", "connect timed out")
    tcp:connect(address, target.port, function(err)
      if req.done then
        return
      end
      if err then
        finish(nil, nil, { kind = "unreachable", message = tostring(err) })
        return
      end
      tcp:nodelay(true)
      arm(timeout, "timeout", "the server went silent")
      tcp:write(H.request_bytes(spec, target, body))
      tcp:read_start(on_read)
    end)
  end

  local host = target.host == "localhost" and "127.0.0.1" or target.host
  if host:match("^[%d%.]+$") or host:find(":") then
    connect(host)
  elseif H.resolved[host] then
    connect(H.resolved[host])
  else
    uv.getaddrinfo(host, nil, { socktype = "stream" }, function(err, res)
      if err or not res or not res[1] then
        finish(nil, nil, { kind = "unreachable", message = "host name not found: " .. host })
        return
      end
      H.resolved[host] = res[1].addr
      connect(res[1].addr)
    end)
  end
  return req
end

--- The same through curl (https, or to compare): `curl -i` writes the status and headers
--- ahead of the decoded body.
function H.curl(spec, body, handlers)
  local req = { done = false }
  local parser = H.parser(spec.stream, true)
  local proc
  local argv = {
    "curl",
    "-sS",
    "-i",
    "-N",
    "-X",
    spec.method or "POST",
    "--connect-timeout",
    tostring((spec.connect_timeout_ms or 1000) / 1000),
    "-H",
    "Content-Type: application/json",
    "-H",
    "Expect:",
  }
  for k, v in pairs(spec.headers or {}) do
    vim.list_extend(argv, { "-H", k .. ": " .. v })
  end
  if body then
    vim.list_extend(argv, { "--data-binary", "@-" })
  end
  table.insert(argv, spec.url .. spec.path)
  local ok, err = pcall(function()
    proc = vim.system(argv, {
      stdin = body,
      stdout = function(_, data)
        if data and not req.done then
          parser.feed(data)
          if #parser.events > 0 and handlers.on_event then
            local events = parser.take_events()
            vim.schedule(function()
              if not req.cancelled then
                for _, ev in ipairs(events) do
                  handlers.on_event(ev)
                end
              end
            end)
          end
        end
      end,
    }, function(out)
      if req.done then
        return
      end
      req.done = true
      vim.schedule(function()
        if (out.code == 7 or out.code == 28) and not parser.status then
          handlers.on_done(nil, nil, { kind = "unreachable", message = "curl exit " .. out.code })
        elseif not parser.status then
          handlers.on_done(nil, nil, { kind = "broken", message = "curl exit " .. out.code })
        else
          handlers.on_done(parser.status, parser.result())
        end
      end)
    end)
  end)
  if not ok then
    req.done = true
    vim.schedule(function()
      handlers.on_done(nil, nil, { kind = "unreachable", message = "curl: " .. tostring(err) })
    end)
  end
  function req.cancel()
    if req.done then
      return
    end
    req.done = true
    req.cancelled = true
    if proc then
      pcall(proc.kill, proc, 15)
    end
  end
  return req
end

return M
