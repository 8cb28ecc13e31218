"""The FIM test model: a copy of the embedded Gemma 3 270M whose header names five of its
unused special tokens (``<unused0>``…``<unused4>``, ids 6–10) as FIM tokens.

No FIM-trained model can be had from the package registries here. Gemma was never trained
to fill in the middle, so this model's text is nonsense; but llama.cpp takes the header's
FIM tokens as they are, so the protocol, the prompt layout and every code path that
depends on them are real. Built with the ``gguf`` package's own ``gguf-new-metadata`` into
a temporary folder by the test setup (never committed).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# role → token id: pre, suf and mid make a FIM model; sep and rep add the repo layout
FIM_IDS = {"fim_pre": 6, "fim_suf": 7, "fim_mid": 8, "fim_sep": 9, "fim_rep": 10}
FIM_ID = "gemma-fim-test"  # its registry id (from the file name)
PSM_ONLY_ID = "gemma-fim-psm"  # pre, suf and mid only: chunks joined by "--- snippet ---"


def build_fim_model(source: Path, folder: Path, roles: tuple[str, ...] = tuple(FIM_IDS),
                    name: str = FIM_ID) -> Path:
    """``folder/<name>.gguf``, written once from ``source`` with ``roles`` as FIM tokens."""
    target = folder / f"{name}.gguf"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{name}.gguf.partial"
    args = [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--force",
            "--general-name", name]
    for role in roles:
        args += ["--special-token-by-id", role, str(FIM_IDS[role])]
    subprocess.run([*args, str(source), str(partial)], check=True, capture_output=True,
                   timeout=600)
    partial.replace(target)
    return target
