# nixpkgs' llama-cpp-python recipe (its CUDA wiring included: CUDA when
# nixpkgs.config.cudaSupport is true, or when overridden with cudaSupport = true), built from
# the sdist of the version pyproject.toml pins: the server is tested against that version,
# and older llama.cpp releases cannot load Gemma 3.
{ lib, config, llama-cpp-python, fetchPypi, autoAddDriverRunpath
, cudaSupport ? config.cudaSupport }:

(llama-cpp-python.override { inherit cudaSupport; }).overridePythonAttrs (old: rec {
  version = "0.3.36";
  src = fetchPypi {
    pname = "llama_cpp_python";
    inherit version;
    hash = "sha256-gy2waZAH8b6Vp+Qe8S6IkmsCuoNkYeNqNjctsnYMGi4=";
  };
  # nixpkgs' patches target its own (older) release.
  patches = [ ];
  # Its test suite downloads models; the import check and ml-offload's tests cover it.
  doCheck = false;
  # libggml-cuda finds the driver's libcuda.so in /run/opengl-driver/lib on NixOS.
  nativeBuildInputs = (old.nativeBuildInputs or [ ])
    ++ lib.optional cudaSupport autoAddDriverRunpath;
  passthru = (old.passthru or { }) // { inherit cudaSupport; };
})
