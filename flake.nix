{
  description = "ml-offload: a local OpenAI-compatible LLM server on llama.cpp, and its Neovim plugin";

  # No flake.lock is committed: it could not be produced where this flake was written
  # (nixpkgs cannot be fetched there). `nix flake lock` writes one on first use.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems f;
      pkgsFor = system: import nixpkgs {
        inherit system;
        overlays = [ self.overlays.default ];
      };
      # CUDA is unfree: this instance accepts it for the `cuda` package only.
      cudaPkgsFor = system: import nixpkgs {
        inherit system;
        overlays = [ self.overlays.default ];
        config = {
          cudaSupport = true;
          allowUnfree = true;
        };
      };
    in
    {
      overlays.default = import ./nix/overlay.nix;

      nixosModules.default = ./nix/module.nix;
      nixosModules.ml-offload = self.nixosModules.default;

      packages = forAllSystems (system:
        let pkgs = pkgsFor system; in {
          default = pkgs.ml-offload;
          ml-offload = pkgs.ml-offload;
          cuda = (cudaPkgsFor system).ml-offload;
          nvim-plugin = pkgs.ml-offload-nvim;
        });

      apps = forAllSystems (system: {
        default = {
          type = "app";
          program = "${self.packages.${system}.default}/bin/ml-offload-server";
          meta.description = "Run the ml-offload API (python -m mloffload.server) on 127.0.0.1:9000";
        };
      });

      devShells = forAllSystems (system: {
        default = (pkgsFor system).callPackage ./nix/shell.nix { };
      });

      checks = forAllSystems (system: {
        inherit (self.packages.${system}) default nvim-plugin;
        # The module under the real NixOS module system: option types, assertions, and the
        # ml-offload-api.service file it generates (which needs the package built).
        nixos-module =
          let
            nixos = nixpkgs.lib.nixosSystem {
              modules = [
                self.nixosModules.default
                {
                  nixpkgs.hostPlatform = system;
                  boot.isContainer = true;
                  system.stateVersion = "25.05";
                  services.ml-offload.enable = true;
                }
              ];
            };
            failed = builtins.filter (a: !a.assertion) nixos.config.assertions;
          in
          assert failed == [ ];
          nixos.config.systemd.units."ml-offload-api.service".unit;
      });
    };
}
