# overlays.default: pkgs.ml-offload (the server), pkgs.ml-offload-nvim (the Neovim plugin),
# and python3Packages.ml-offload in every Python package set.
final: prev: {
  pythonPackagesExtensions = (prev.pythonPackagesExtensions or [ ])
    ++ [ (import ./python-packages.nix) ];
  ml-offload = final.callPackage ./app.nix { };
  ml-offload-nvim = final.callPackage ./nvim-plugin.nix { };
}
