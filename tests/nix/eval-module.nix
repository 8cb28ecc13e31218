# Evaluates nix/module.nix under the stub lib for one set of option values (JSON) and returns
# what NixOS would build from it: the option declarations, type errors, and the config.
# nix-instantiate --eval --strict --json tests/nix/eval-module.nix --argstr settingsJson '{...}'
{ settingsJson }:

let
  lib = import ./stub-lib.nix;
  settings = builtins.fromJSON settingsJson;
  module = import ../../nix/module.nix;
  evaluated = module {
    inherit lib;
    config.services.ml-offload = cfg;
    pkgs = throw "the deploy test must set services.ml-offload.package";
  };
  declared = evaluated.options.services.ml-offload;
  value = name: option:
    let v = settings.${name} or option.default;
    in if option.type ? coerce then option.type.coerce v else v;
  cfg = builtins.mapAttrs value declared;
  unknown = builtins.filter (name: !(declared ? ${name})) (builtins.attrNames settings);
in
{
  options = builtins.mapAttrs (name: option: {
    type = option.type.name;
    description = option.description or null;
    default = if name == "package" then null else option.default;
  }) declared;
  typeErrors = unknown ++ builtins.filter (name: !(declared.${name}.type.check cfg.${name}))
    (builtins.attrNames (builtins.removeAttrs declared [ "package" ]));
  inherit (evaluated) config;
}
