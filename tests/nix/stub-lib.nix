# A stand-in for nixpkgs' `lib`, just large enough to evaluate nix/module.nix and flake.nix
# with plain nix-instantiate where nixpkgs cannot be fetched. Each function behaves as its
# nixpkgs namesake for the way those files use it (mkIf only at the top of `config`); option
# types carry a `check` so defaults and test values are type-checked as NixOS would.
# Adding a lib function to the module means adding it here, or the deploy tests fail loudly.
let
  inherit (builtins) all attrValues elem isAttrs isBool isInt isList isPath isString substring stringLength;

  hasPrefix = prefix: s: substring 0 (stringLength prefix) s == prefix;
  lowerChars = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  upperChars = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];

  type = name: check: { inherit name check; };
  types = {
    str = type "str" isString;
    bool = type "bool" isBool;
    int = type "int" isInt;
    port = type "port" (x: isInt x && x >= 0 && x <= 65535);
    path = type "path" (x: isPath x || (isString x && hasPrefix "/" x));
    package = type "package" (x: isAttrs x || isString x);
    enum = values: type "enum [${toString (map (v: "\"${toString v}\"") values)}]" (x: elem x values);
    nullOr = t: type "null or ${t.name}" (x: x == null || t.check x);
    listOf = t: type "list of ${t.name}" (x: isList x && all t.check x);
    attrsOf = t: type "attribute set of ${t.name}" (x: isAttrs x && all t.check (attrValues x));
    either = a: b: type "${a.name} or ${b.name}" (x: a.check x || b.check x);
    coercedTo = from: f: to: (type "${to.name} or ${from.name} convertible to it"
      (x: to.check x || (from.check x && to.check (f x)))) // {
        coerce = x: if to.check x then x else f x;
      };
  };
in
{
  inherit types hasPrefix;
  elem = builtins.elem;
  toLower = builtins.replaceStrings upperChars lowerChars;
  toList = x: if isList x then x else [ x ];
  optional = cond: x: if cond then [ x ] else [ ];
  optionalAttrs = cond: attrs: if cond then attrs else { };
  concatMapStringsSep = sep: f: list: builtins.concatStringsSep sep (map f list);
  genAttrs = names: f: builtins.listToAttrs (map (name: { inherit name; value = f name; }) names);
  literalExpression = text: { _type = "literalExpression"; inherit text; };

  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = name: {
    _type = "option";
    type = types.bool;
    default = false;
    description = "Whether to enable ${name}.";
  };
  mkIf = cond: content: if cond then content else { };

  # For nix/package.nix: file sets are described (paths as strings) rather than copied.
  fileset = {
    toSource = { root, fileset }: { root = toString root; inherit fileset; };
    unions = map (f: if isPath f then toString f else f);
    difference = include: exclude: { include = toString include; inherit exclude; };
    fileFilter = predicate: path: { filter = toString path; };
    maybeMissing = toString;
  };
  meta.availableOn = platform: pkg:
    !(pkg ? meta.platforms) || elem platform.system pkg.meta.platforms;
  licenses.mit = "mit";
  platforms.linux = [ "x86_64-linux" "aarch64-linux" ];
}
