--- :checkhealth ml-offload — each failure names its fix.
--- The Python facts come from the remote plugin itself (MLOffloadHealth), so they describe
--- the very host that runs the plugin, not some other Python on the PATH.
local M = {}
local health = vim.health

local H = {}

function H.manifest_path()
  if vim.env.NVIM_RPLUGIN_MANIFEST and vim.env.NVIM_RPLUGIN_MANIFEST ~= "" then
    return vim.fn.fnamemodify(vim.env.NVIM_RPLUGIN_MANIFEST, ":p")
  end
  return vim.fn.stdpath("data") .. "/rplugin.vim"
end

function H.host_prog()
  return vim.g.python3_host_prog or "python3"
end

--- Required checks: without any of these the plugin cannot work.
M.required = {
  {
    name = "Neovim 0.10 or newer",
    run = function()
      local v = vim.version()
      local text = string.format("Neovim %d.%d.%d", v.major, v.minor, v.patch)
      if vim.fn.has("nvim-0.10") == 1 then
        return true, text
      end
      return false, text .. " is too old", { "upgrade Neovim to 0.10 or newer" }
    end,
  },
  {
    name = "python3 provider",
    run = function()
      if vim.fn.has("python3") == 1 then
        return true, "python3 provider: " .. H.host_prog()
      end
      return false,
        "the python3 provider is not available (" .. H.host_prog() .. ")",
        {
          H.host_prog() .. " -m pip install pynvim httpx",
          "or point g:python3_host_prog at a Python that has pynvim",
          "see :checkhealth vim.provider",
        }
    end,
  },
  {
    name = "remote plugin registered",
    run = function()
      local path = H.manifest_path()
      local ok, lines = pcall(vim.fn.readfile, path)
      local text = ok and table.concat(lines, "\n") or ""
      local missing = {}
      for _, cmd in ipairs({ "MLOffloadCall", "MLOffloadHealth" }) do
        if not text:find("ml_offload.py", 1, true) or not text:find("'" .. cmd .. "'", 1, true) then
          table.insert(missing, cmd)
        end
      end
      if #missing == 0 then
        return true, "remote plugin functions in the manifest " .. path
      end
      return false,
        "not registered in " .. path .. ": " .. table.concat(missing, ", "),
        {
          "run :UpdateRemotePlugins, then restart Neovim",
          "with lazy.nvim: build = ':UpdateRemotePlugins'",
        }
    end,
  },
}

function H.report(ok, msg, advice)
  if ok then
    health.ok(msg)
  else
    health.error(msg, advice)
  end
end

function H.host_facts()
  if vim.fn.exists("*MLOffloadHealth") == 0 and vim.fn.exists("#FuncUndefined#MLOffloadHealth") == 0 then
    return nil, "MLOffloadHealth is not defined"
  end
  local ok, facts = pcall(vim.fn.MLOffloadHealth)
  if not ok then
    return nil, tostring(facts)
  end
  if type(facts) ~= "table" or vim.tbl_isempty(facts) then
    return nil, "the remote plugin answered nothing (see its log)"
  end
  return facts
end

function H.python(facts)
  health.start("ml-offload: Python host")
  health.ok(string.format("Python %s (%s)", facts.python_version or "?", facts.python or "?"))
  if facts.pynvim ~= "" then
    health.ok("pynvim " .. facts.pynvim)
  else
    health.warn("pynvim version unknown")
  end
  if facts.httpx ~= "" then
    health.ok("httpx " .. facts.httpx)
  else
    health.error("httpx is not installed in the Python host", { facts.python .. " -m pip install httpx" })
  end
  health.ok("mloffload importable from " .. (facts.mloffload or "?"))
  health.info("plugin log: " .. (facts.log or "?"))
end

function H.server(facts, fallback_on)
  local s = facts.server or {}
  health.start("ml-offload: server")
  if s.ok then
    local h = s.health or {}
    local line = string.format("%s: %s (backend %s)", s.url, h.status or "?", h.backend or "?")
    if h.status == "healthy" then
      health.ok(line)
    else
      health.warn(line, { "the backend is not ready yet: see :MLStatus" })
    end
    for name, d in pairs(h.backends or {}) do
      health.info(
        string.format(
          "%s: available %s, ready %s — %s",
          name,
          tostring(d.available),
          tostring(d.ready),
          d.details or ""
        )
      )
    end
    local vram = s.vram or {}
    if vram.available then
      for _, g in ipairs(vram.gpus or {}) do
        health.ok(string.format("GPU %d %s: %.1f / %.1f GB used", g.index, g.name, g.used_gb, g.total_gb))
      end
    else
      health.warn("no GPU: " .. tostring(vram.reason or "unknown") .. " (inference runs on the CPU)", {
        "install the NVIDIA driver and nvidia-ml-py where the server runs",
      })
    end
    return
  end
  if s.auth then
    health.error("the server refused the API key: " .. tostring(s.error), {
      "set api_key in require('ml-offload').setup({ api_key = ... })",
      "or export ML_OFFLOAD_API_KEY before starting Neovim",
    })
    return
  end
  if s.status then
    health.error("the server answered with an error: " .. tostring(s.error), {
      "check that api_url points at an ml-offload server (default http://127.0.0.1:9000;"
        .. " llama-server itself listens on 8080)",
      "see the server's log",
    })
    return
  end
  local advice = {
    "start it: python -m mloffload.server (listens on http://127.0.0.1:9000)",
    "or set api_url in require('ml-offload').setup()",
  }
  local msg = "server not reachable: " .. tostring(s.error or "unknown error")
  if fallback_on and s.unreachable then
    health.warn(msg .. " — requests use the in-process fallback", advice)
  else
    health.error(msg, advice)
  end
end

function H.fallback(facts)
  local f = facts.fallback or {}
  health.start("ml-offload: in-process fallback")
  if not f.enabled then
    health.info("off (fallback = false): an unreachable server is an error")
    return
  end
  local server_down = not (facts.server or {}).ok
  local fail = server_down and health.error or health.warn
  if not f.ok then
    fail("not ready: " .. tostring(f.engine ~= "" and f.engine or f.model), { f.fix })
    return
  end
  health.ok("engine: " .. tostring(f.engine))
  health.ok("model: " .. tostring(f.model))
  if f.plan and f.plan ~= "" then
    health.ok("plan: " .. f.plan)
  end
  local state = f.state or {}
  if state.loaded then
    health.info(
      string.format("loaded now: %s (%d/%d layers on GPU)", state.model, state.n_gpu_layers, state.max_layers)
    )
  end
end

function M.check()
  health.start("ml-offload: editor")
  local all = true
  for _, check in ipairs(M.required) do
    local ok, msg, advice = check.run()
    H.report(ok, msg, advice)
    all = all and ok
  end
  if not all then
    return
  end
  local facts, err = H.host_facts()
  if not facts then
    health.error("the remote plugin did not answer: " .. err, {
      "run :UpdateRemotePlugins and restart Neovim",
      H.host_prog() .. " -m pip install pynvim httpx",
    })
    return
  end
  H.python(facts)
  local cfg = require("ml-offload.config").get()
  H.server(facts, cfg.fallback)
  H.fallback(facts)
end

return M
