"""The torch/torchvision pairing: pure-Python torchvision, transformers and open_clip import."""

import importlib

from retrieval._compat import ensure_torchvision


def test_torchvision_transformers_open_clip_import_beside_cpu_torch():
    ops = ensure_torchvision()
    tv = importlib.import_module("torchvision")
    transforms = importlib.import_module("torchvision.transforms")
    importlib.import_module("transformers")
    importlib.import_module("open_clip")
    assert tv.__version__.startswith("0.28")
    assert hasattr(transforms, "Compose")
    if not ops:  # CPU torch: detection ops are unavailable, and say so clearly
        import pytest
        import torch

        with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
            tv.ops.nms(torch.zeros((1, 4)), torch.zeros(1), 0.5)


def test_settings_table_in_the_docs_is_the_code():
    """docs/architecture.md lists exactly the environment variables retrieval/settings.py reads."""
    from pathlib import Path

    from retrieval.settings import markdown_table

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    table = doc.split("<!-- settings-table -->\n", 1)[1].split("\n<!-- /settings-table -->", 1)[0]
    assert table == markdown_table()


def test_no_module_reads_the_environment_behind_settings():
    """Every os.environ read in the package goes through retrieval/settings.py."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    allowed = {root / "retrieval" / "settings.py", root / "retrieval" / "__init__.py"}
    offenders = [str(p.relative_to(root)) for pkg in ("retrieval", "indexer", "api", "eval")
                 for p in (root / pkg).rglob("*.py")
                 if p not in allowed and re.search(r"os\.environ(?!\.get\(a\.api_key_env)|os\.getenv", p.read_text())]
    assert offenders == []
