# The nixpkgs attribute names of pyproject.toml's [project] dependencies, in order.
# PyPI names are normalised as PEP 503 does ("Foo_Bar.baz" -> "foo-bar-baz"), which is how
# nixpkgs names its Python packages. Only builtins: tests/test_deploy.py evaluates this file
# with plain nix-instantiate, without nixpkgs.
pyprojectFile:

let
  project = (builtins.fromTOML (builtins.readFile pyprojectFile)).project;
  # The distribution name: everything before the first version, extra or marker character.
  distName = requirement: builtins.head (builtins.match "[[:space:]]*([A-Za-z0-9._-]+).*" requirement);
  lower = builtins.replaceStrings
    [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ]
    [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  # Runs of "-", "_" and "." become one "-".
  normalise = name: builtins.concatStringsSep "-"
    (builtins.filter (part: builtins.isString part && part != "") (builtins.split "[-_.]+" (lower name)));
in
{
  inherit (project) version;
  names = map (requirement: normalise (distName requirement)) project.dependencies;
}
