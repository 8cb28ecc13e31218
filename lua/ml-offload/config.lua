--- Configuration: the defaults, and the merged table `setup()` leaves behind.
--- The Python side reads it with `require('ml-offload.config').get()` on every request,
--- so changes made by a later `setup()` call apply at once.
local M = {}

M.defaults = {
  -- The ml-offload server (`python -m mloffload.server`).
  api_url = "http://127.0.0.1:9000",
  api_key = nil, -- or $ML_OFFLOAD_API_KEY; sent as "Authorization: Bearer ..."
  timeout = 30000, -- ms to wait for the server to answer (per streamed piece while streaming)
  model = "default", -- registry id or alias; :MLModels <CR> changes it
  system_prompt = nil, -- a string sent as the system message of every chat
  -- Request parameters passed as they are to /v1/chat/completions.
  params = { temperature = 0.7, max_tokens = 1024 },
  window = {
    border = "rounded",
    width = 0.7, -- ratios of the editor's size
    height = 0.6,
    title = "ml-offload", -- prefix of every float's title
  },
  -- Global keymaps (normal and visual mode); a key set to false is not mapped.
  keymaps = {
    chat = "<leader>mc",
    status = "<leader>ms",
    embed = "<leader>me",
    models = "<leader>mm",
  },
  -- Buffer-local keys in the chat float.
  chat_keymaps = {
    followup = "<CR>",
    cancel = "<C-c>",
    close = "q",
  },
  embed_register = false, -- e.g. "e": :MLEmbed puts the vector (JSON) in that register
  -- In-process inference when the server cannot be reached.
  fallback = true,
  fallback_model = "default", -- registry id, alias or .gguf path
  fallback_keep_alive = "5m", -- unload the fallback model after this long idle
  data_dir = nil, -- registry and models of the fallback; default: the server's
}

local config = vim.deepcopy(M.defaults)

--- Deep-merge `opts` over the defaults (lists and scalars replace, tables merge).
function M.setup(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("ml-offload: setup() takes a table of options", 2)
  end
  config = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts or {})
  return config
end

function M.get()
  return config
end

function M.set(key, value)
  config[key] = value
end

return M
