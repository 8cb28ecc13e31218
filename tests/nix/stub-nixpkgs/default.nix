# A stand-in for `import nixpkgs { ... }`: a package set in which callPackage records what
# it was asked to build (file, arguments, whether CUDA was on) instead of building it, with
# the overlays applied as nixpkgs applies them.
{ system, overlays ? [ ], config ? { } }:

let
  base = final: {
    inherit system config;
    lib = import ../stub-lib.nix;
    pythonPackagesExtensions = [ ];
    callPackage = file: args: {
      file = toString file;
      inherit args;
      cudaSupport = config.cudaSupport or false;
      outPath = "/nix/store/00000000000000000000000000000000-${baseNameOf (toString file)}";
    };
  };
  apply = final: builtins.foldl' (prev: overlay: prev // overlay final prev) (base final) overlays;
  pkgs = apply pkgs;
in
pkgs
