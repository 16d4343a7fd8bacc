"""The repository root must not shadow other distributions' top-level packages: the top-level kernels/ and csrc/
folders (links to the files in sae_fast/) are not packages, so `import kernels` from the root finds Hugging Face's
`kernels` (transformers imports it) or nothing, never our folder."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json, sys
out = {}
for name in ("kernels", "csrc"):
    spec = importlib.util.find_spec(name)
    out[name] = None if spec is None else spec.origin
print(json.dumps(out))
"""


def test_root_folders_do_not_shadow_top_level_packages():
    import json

    res = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    for name, origin in json.loads(res.stdout).items():
        # None: no package of that name (or a namespace portion only); else another distribution's (a venv inside
        # the checkout is fine), never our folders
        ours = (ROOT / name, ROOT / "sae_fast")
        assert origin is None or not any(Path(origin).resolve().is_relative_to(p) for p in ours), (name, origin)
    for name in ("kernels", "csrc"):  # the folders are there, with the sources
        assert any((ROOT / name).iterdir()) and all(p.resolve().is_relative_to(ROOT / "sae_fast" / name)
                                                    for p in (ROOT / name).iterdir())
