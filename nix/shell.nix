# Development shell: Python with the server's dependencies and the test tools, Neovim, ruff,
# and the build tools ./dev uses. Inside it, `python -m pytest` runs against ./python.
{ mkShell, python3, neovim, ruff, cmake, ninja, nix }:

let
  python = python3.override {
    self = python;
    packageOverrides = import ./python-packages.nix;
  };
  env = python.withPackages (ps: ps.ml-offload.dependencies ++ [
    ps.pynvim
    ps.openai
    ps.pytest
    ps.pytest-timeout
    ps.psutil
    ps.mypy
  ]);
in
mkShell {
  packages = [ env neovim ruff cmake ninja nix ];
  shellHook = ''
    export PYTHONPATH="$PWD/python''${PYTHONPATH:+:$PYTHONPATH}"
  '';
}
