# The Neovim plugin: lua/ml-offload (setup, keymaps, :checkhealth) and the pynvim remote
# plugin in rplugin/python3. Its Python host needs pynvim and the mloffload package (the HTTP
# client, and the in-process fallback engine when the server is down); they are declared in
# passthru.python3Dependencies, which nixpkgs' Neovim wrapper (and home-manager's
# programs.neovim) add to Neovim's python3 host, where it also registers the remote plugin.
{ lib, vimUtils }:

let
  requirements = import ./requirements.nix ../pyproject.toml;
  fs = lib.fileset;
  plugin = path: fs.maybeMissing path;
  noBytecode = dir: if builtins.pathExists dir
    then fs.difference dir (fs.fileFilter (file: file.hasExt "pyc") dir)
    else fs.unions [ ];
in
vimUtils.buildVimPlugin {
  pname = "ml-offload-nvim";
  inherit (requirements) version;
  src = fs.toSource {
    root = ../.;
    fileset = fs.unions [
      (plugin ../lua)
      (plugin ../plugin)
      (plugin ../doc/ml-offload.txt)
      (noBytecode ../rplugin)
    ];
  };
  passthru.python3Dependencies = ps: [
    ps.pynvim
    ((import ./python-packages.nix) ps ps).ml-offload
  ];
  meta = {
    description = "Neovim plugin for the ml-offload local LLM server (:MLChat, :MLStatus, ...)";
    license = lib.licenses.mit;
  };
}
