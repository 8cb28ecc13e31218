# The server as an application: ml-offload-server (python -m mloffload.server) and its
# dependencies, on this nixpkgs' python3 extended with ./python-packages.nix.
{ python3 }:

let
  python = python3.override {
    self = python;
    packageOverrides = import ./python-packages.nix;
  };
in
python.pkgs.toPythonApplication python.pkgs.ml-offload
