--- Configuration: the one place that holds the plugin's defaults, and the merged table
--- `setup()` leaves behind. The Python side gets it with every call into the remote plugin
--- (`rpc.request` sends `resolved()` along), so a later `setup()` applies at once.
local M = {}

---@alias MLOffloadLayout "float"|"vsplit"|"tab"
---@alias MLOffloadKey string|false|string[]

---@class MLOffloadWindowConfig
---@field border? string|string[] Border of every float ("rounded")
---@field width? number Ratio of the editor's columns (0.7)
---@field height? number Ratio of the editor's lines (0.6)
---@field title? string First part of every float's title ("ml-offload")

---@class MLOffloadChatKeymaps
---@field send? MLOffloadKey Normal mode: send the message under the last "## You" ("<CR>")
---@field send_insert? MLOffloadKey Insert mode: send ("<C-s>")
---@field stop? MLOffloadKey Stop the answer in flight ("<C-c>")
---@field hide? MLOffloadKey Hide the chat; :MLChat or :MLChatToggle shows it again ("q")
---@field help? MLOffloadKey Show every key ("?")
---@field yank? MLOffloadKey Yank the code block under the cursor ("gy")
---@field replace? MLOffloadKey Replace the chat's selection with the code block, as a diff ("gs")
---@field insert? MLOffloadKey Insert the code block at the source window's cursor, as a diff ("gp")

---@class MLOffloadChatConfig
---@field layout? MLOffloadLayout Where chats open ("float")
---@field split_width? number Width of a vsplit chat, ratio of the columns (0.4)
---@field dir? string Where chats are saved; default stdpath("data") .. "/ml-offload/chats"
---@field save? boolean Save every chat as markdown as it goes (true)
---@field register? string Register the yank key writes ('"')
---@field keymaps? MLOffloadChatKeymaps

---@class MLOffloadDiffKeymaps
---@field accept? MLOffloadKey Take the proposal, as :MLAccept ("ga")
---@field reject? MLOffloadKey Drop it, as :MLReject, and stop its generation ({ "gr", "q", "<C-c>" })

---@class MLOffloadKeymaps
---@field chat? MLOffloadKey ":MLChat" (visual: a new chat about the selection) ("<leader>mc")
---@field toggle? MLOffloadKey ":MLChatToggle" ("<leader>mt")
---@field history? MLOffloadKey ":MLChatHistory" ("<leader>mh")
---@field edit? MLOffloadKey ":MLEdit" on the line or selection ("<leader>mi")
---@field status? MLOffloadKey ":MLStatus" ("<leader>ms")
---@field embed? MLOffloadKey ":MLEmbed" ("<leader>me")
---@field models? MLOffloadKey ":MLModels" ("<leader>mm")

---@class MLOffloadCompleteKeymaps
---@field accept? MLOffloadKey Insert mode: take the whole suggestion; without one, the key's own job ("<Tab>")
---@field accept_line? MLOffloadKey Take its first line ("<S-Tab>")
---@field accept_word? MLOffloadKey Take its first word ("<C-Right>")
---@field dismiss? MLOffloadKey Hide it (false; moving the cursor or <Esc> hides it too)
---@field trigger? MLOffloadKey Ask now, without waiting for the pause (false)

---@class MLOffloadCompleteConfig
---@field enabled? boolean Ghost text in insert mode (true); :MLComplete on|off|toggle
---@field filetypes? table<string, boolean> Per filetype, "*" for the rest ({ ["*"] = true, help = false, ... })
---@field debounce_ms? integer Pause after a keystroke before asking (100)
---@field model? string The model that completes (nil: the server's fim_model)
---@field n_predict? integer Most tokens a suggestion has (96)
---@field t_max_predict_ms? integer After a newline, stop a suggestion that took longer (800)
---@field prefix_tokens? integer Budget of the lines above the cursor, in tokens (384)
---@field suffix_tokens? integer Budget of the cursor line's rest and the lines below (128)
---@field ring_chunks? integer Chunks of other code kept as extra context (16; 0: none)
---@field ring_chunk_lines? integer Lines per chunk (48)
---@field ring_tokens? integer Budget of all chunks sent, in tokens (1536)
---@field params? table Fields sent as they are with every /infill request
---@field transport? "uv"|"curl"|"python" How requests go to the server ("uv"; see :help)
---@field keymaps? MLOffloadCompleteKeymaps

---@class MLOffloadStatuslineConfig
---@field poll_ms? integer How often /status is asked while a statusline shows it (5000; 0: never)
---@field separator? string (" · ")
---@field icons? table<string, string> Completion state: idle, thinking, off, fallback

---@class MLOffloadConfig
---@field api_url? string The ml-offload server ("http://127.0.0.1:9000")
---@field api_key? string Bearer key; default $ML_OFFLOAD_API_KEY
---@field timeout? integer ms of silence allowed from a server that is answering (30000)
---@field model? string Registry id or alias ("default")
---@field system_prompt? string System message of every new chat (nil: none)
---@field params? table Request fields sent as they are to /v1/chat/completions
---@field window? MLOffloadWindowConfig
---@field keymaps? MLOffloadKeymaps
---@field chat? MLOffloadChatConfig
---@field diff? { keymaps?: MLOffloadDiffKeymaps }
---@field embed_register? string|false Register :MLEmbed writes the vector to (false)
---@field fallback? boolean In-process inference when the server is unreachable (true)
---@field fallback_model? string Registry id, alias or .gguf path ("default")
---@field fallback_keep_alive? string|number Unload the idle fallback model after this ("5m")
---@field data_dir? string Registry and models of the fallback; default: the server's
---@field complete? MLOffloadCompleteConfig Ghost text (code completion)
---@field statusline? MLOffloadStatuslineConfig require("ml-offload").statusline()

---@type MLOffloadConfig
M.defaults = {
  api_url = "http://127.0.0.1:9000",
  api_key = nil,
  timeout = 30000,
  model = "default",
  system_prompt = nil,
  params = { temperature = 0.7, max_tokens = 1024 },
  window = {
    border = "rounded",
    width = 0.7,
    height = 0.6,
    title = "ml-offload",
  },
  keymaps = {
    chat = "<leader>mc",
    toggle = "<leader>mt",
    history = "<leader>mh",
    edit = "<leader>mi",
    status = "<leader>ms",
    embed = "<leader>me",
    models = "<leader>mm",
  },
  chat = {
    layout = "float",
    split_width = 0.4,
    dir = nil,
    save = true,
    register = '"',
    keymaps = {
      send = "<CR>",
      send_insert = "<C-s>",
      stop = "<C-c>",
      hide = "q",
      help = "?",
      yank = "gy",
      replace = "gs",
      insert = "gp",
    },
  },
  diff = {
    keymaps = {
      accept = "ga",
      reject = { "gr", "q", "<C-c>" },
    },
  },
  embed_register = false,
  fallback = true,
  fallback_model = "default",
  fallback_keep_alive = "5m",
  data_dir = nil,
  complete = {
    enabled = true,
    filetypes = { ["*"] = true, help = false, gitcommit = false, gitrebase = false },
    debounce_ms = 100,
    model = nil,
    n_predict = 96,
    t_max_predict_ms = 800,
    prefix_tokens = 384,
    suffix_tokens = 128,
    ring_chunks = 16,
    ring_chunk_lines = 48,
    ring_tokens = 1536,
    params = { samplers = { "top_k", "top_p", "infill" }, top_k = 40, top_p = 0.99 },
    transport = "uv",
    keymaps = {
      accept = "<Tab>",
      accept_line = "<S-Tab>",
      accept_word = "<C-Right>",
      dismiss = false,
      trigger = false,
    },
  },
  statusline = {
    poll_ms = 5000,
    separator = " · ",
    icons = { idle = "●", thinking = "◐", off = "○", fallback = "◆ local" },
  },
}

local H = {}

local config = vim.deepcopy(M.defaults)

--- Deep merge where tables merge and scalars and lists (e.g. a list of keys) replace.
function H.merge(base, over)
  if type(base) == "table" and type(over) == "table" and next(over) == nil then
    return vim.deepcopy(base) -- {} changes nothing
  end
  if type(base) ~= "table" or type(over) ~= "table" or vim.islist(over) or vim.islist(base) then
    return vim.deepcopy(over)
  end
  local out = vim.deepcopy(base)
  for k, v in pairs(over) do
    out[k] = H.merge(out[k], v)
  end
  return out
end

--- vim.validate in both of its forms (0.11's positional one, 0.10's table).
function H.check(name, value, kind)
  if vim.fn.has("nvim-0.11") == 1 then
    vim.validate(name, value, kind, true)
  else
    vim.validate({ [name] = { value, kind, true } })
  end
end

function H.is_key(value)
  if value == false or type(value) == "string" then
    return true
  end
  if type(value) ~= "table" then
    return false
  end
  for _, v in ipairs(value) do
    if type(v) ~= "string" then
      return false
    end
  end
  return true
end

function H.one_of(choices)
  return function(value)
    return vim.tbl_contains(choices, value), "one of " .. table.concat(choices, ", ")
  end
end

function H.count(value)
  return type(value) == "number" and value >= 0 and math.floor(value) == value, "a whole number, 0 or more"
end

function H.ratio(value)
  return type(value) == "number" and value > 0 and value <= 1, "a number in (0, 1]"
end

--- Type checks of every option, so a typo fails in setup() with its name, not later.
function H.validate(c)
  H.check("api_url", c.api_url, "string")
  H.check("api_key", c.api_key, "string")
  H.check("timeout", c.timeout, "number")
  H.check("model", c.model, "string")
  H.check("system_prompt", c.system_prompt, "string")
  H.check("params", c.params, "table")
  H.check("window", c.window, "table")
  H.check("window.width", c.window.width, H.ratio)
  H.check("window.height", c.window.height, H.ratio)
  H.check("window.title", c.window.title, "string")
  H.check("keymaps", c.keymaps, "table")
  for name, lhs in pairs(c.keymaps) do
    H.check("keymaps." .. name, lhs, function(v)
      return H.is_key(v), "a key, a list of keys, or false"
    end)
  end
  H.check("chat", c.chat, "table")
  H.check("chat.layout", c.chat.layout, H.one_of({ "float", "vsplit", "tab" }))
  H.check("chat.split_width", c.chat.split_width, H.ratio)
  H.check("chat.dir", c.chat.dir, "string")
  H.check("chat.save", c.chat.save, "boolean")
  H.check("chat.register", c.chat.register, "string")
  for name, lhs in pairs(c.chat.keymaps or {}) do
    H.check("chat.keymaps." .. name, lhs, function(v)
      return H.is_key(v), "a key, a list of keys, or false"
    end)
  end
  for name, lhs in pairs((c.diff or {}).keymaps or {}) do
    H.check("diff.keymaps." .. name, lhs, function(v)
      return H.is_key(v), "a key, a list of keys, or false"
    end)
  end
  H.check("embed_register", c.embed_register, function(v)
    return v == false or type(v) == "string", "a register name or false"
  end)
  H.check("fallback", c.fallback, "boolean")
  H.check("fallback_model", c.fallback_model, "string")
  H.check("fallback_keep_alive", c.fallback_keep_alive, { "string", "number" })
  H.check("data_dir", c.data_dir, "string")
  local cc = c.complete
  H.check("complete", cc, "table")
  H.check("complete.enabled", cc.enabled, "boolean")
  H.check("complete.filetypes", cc.filetypes, "table")
  for _, name in ipairs({ "debounce_ms", "n_predict", "t_max_predict_ms", "prefix_tokens", "suffix_tokens" }) do
    H.check("complete." .. name, cc[name], H.count)
  end
  for _, name in ipairs({ "ring_chunks", "ring_chunk_lines", "ring_tokens" }) do
    H.check("complete." .. name, cc[name], H.count)
  end
  H.check("complete.model", cc.model, "string")
  H.check("complete.params", cc.params, "table")
  H.check("complete.transport", cc.transport, H.one_of({ "uv", "curl", "python" }))
  for name, lhs in pairs(cc.keymaps or {}) do
    H.check("complete.keymaps." .. name, lhs, function(v)
      return H.is_key(v), "a key, a list of keys, or false"
    end)
  end
  H.check("statusline", c.statusline, "table")
  H.check("statusline.poll_ms", c.statusline.poll_ms, H.count)
  H.check("statusline.separator", c.statusline.separator, "string")
  H.check("statusline.icons", c.statusline.icons, "table")
end

--- Deep-merge `opts` over the defaults (lists and scalars replace, tables merge) and check
--- every option's type. Each call starts from the defaults again.
---@param opts? MLOffloadConfig
---@return MLOffloadConfig
function M.setup(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("ml-offload: setup() takes a table of options", 2)
  end
  local merged = H.merge(M.defaults, opts or {})
  local ok, err = pcall(H.validate, merged)
  if not ok then
    error("ml-offload: setup(): " .. tostring(err):gsub("^.-:%d+: ", ""), 2)
  end
  config = merged
  return config
end

---@return MLOffloadConfig
function M.get()
  return config
end

function M.set(key, value)
  config[key] = value
end

--- What the remote plugin reads: the merged table with the computed defaults filled in.
---@return MLOffloadConfig
function M.resolved()
  local out = vim.deepcopy(config)
  out.chat.dir = out.chat.dir or (vim.fn.stdpath("data") .. "/ml-offload/chats")
  return out
end

--- The keys of an option as a list: "x" -> { "x" }, false -> {}.
---@param value MLOffloadKey|nil
---@return string[]
function M.keys(value)
  if type(value) == "string" then
    return value ~= "" and { value } or {}
  end
  if type(value) == "table" then
    return value
  end
  return {}
end

return M
