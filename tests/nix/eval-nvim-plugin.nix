# Evaluates nix/nvim-plugin.nix with a stub vimUtils: its name, version, source folders and
# the Python packages it asks Neovim's python3 host for.
let
  lib = import ./stub-lib.nix;
  drv = import ../../nix/nvim-plugin.nix {
    inherit lib;
    vimUtils.buildVimPlugin = attrs: attrs;
  };
  ps = {
    pynvim.pname = "pynvim";
    callPackage = file: args: { pname = baseNameOf (toString file); };
  };
in
{
  inherit (drv) pname version src;
  python3Dependencies = map (dep: dep.pname) (drv.passthru.python3Dependencies ps);
}
