# Evaluates flake.nix's outputs with the stub nixpkgs: which outputs exist per system, what
# each package is built from, and what the overlay adds. Paths are returned as strings.
let
  flake = import ../../flake.nix;
  nixpkgs = {
    lib = import ./stub-lib.nix;
    outPath = toString ./stub-nixpkgs;
  };
  self = flake.outputs { inherit self nixpkgs; } // { outPath = toString ../..; };
  describe = drv: { inherit (drv) file cudaSupport; };
  perSystem = f: builtins.mapAttrs (system: f);
in
{
  inherit (flake) description;
  inputs = builtins.mapAttrs (name: input: input.url) flake.inputs;
  outputs = builtins.attrNames self;
  packages = perSystem (builtins.mapAttrs (name: describe)) self.packages;
  apps = perSystem (builtins.mapAttrs (name: app: app)) self.apps;
  devShells = perSystem (builtins.mapAttrs (name: describe)) self.devShells;
  checks = perSystem (builtins.attrNames) self.checks;
  nixosModules = builtins.mapAttrs (name: toString) self.nixosModules;
  overlay = builtins.attrNames (self.overlays.default { } { pythonPackagesExtensions = [ ]; });
}
