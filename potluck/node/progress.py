"""The terminal progress bar for model downloads: tqdm drawing through rich (shared by node and CLI)."""

from __future__ import annotations

import warnings
from typing import Any

from tqdm import TqdmExperimentalWarning
from tqdm.rich import tqdm_rich


class RichDownloadBar(tqdm_rich):
    """``tqdm.rich`` without its "experimental" warning; pass it as huggingface_hub's ``tqdm_class``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TqdmExperimentalWarning)
            super().__init__(*args, **kwargs)
