"""medrag's online side: encoders, indexes, report entities and search.

Importing this package sets the Hugging Face libraries to offline mode (unless the caller already
chose otherwise): medrag loads weights only from local paths, and a silent hub download at run
time would break in hospitals and in CI alike.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__: list[str] = []
