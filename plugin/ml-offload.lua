-- ml-offload: its commands and <Plug> maps. Kept tiny: it runs at every startup; every
-- module behind a command loads on first use. The work is done by the remote plugin
-- (rplugin/python3/ml_offload.py), reached through require("ml-offload.rpc").
if vim.g.loaded_ml_offload then
  return
end
vim.g.loaded_ml_offload = 1

require("ml-offload.commands").create()
require("ml-offload.keymaps").plugs()
