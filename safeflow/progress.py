"""Progress bars that suit where the output goes.

On a terminal (or in a notebook) :func:`progress_bar` is tqdm's usual bar. When stderr is not a
terminal — a log file, a pipe, a CI job — a bar redrawn with carriage returns becomes one very long
line, so the bar is written instead as one plain line every :data:`LINE_INTERVAL` seconds (and a
last one when it ends), e.g. ``extract:  40%|████      | 400/1000 [00:12<00:18, 33.1row/s]``.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any, TextIO

from tqdm import tqdm as plain_tqdm
from tqdm.autonotebook import tqdm as auto_tqdm

#: Seconds between progress lines when the output is not a terminal
#: (``SAFEFLOW_PROGRESS_INTERVAL`` overrides).
LINE_INTERVAL = 30.0


class LineWriter(io.TextIOBase):
    """A text stream for tqdm that writes each redraw as one line of its own (no carriage returns)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Any = None, *, file: TextIO | None = None, **kwargs: Any) -> plain_tqdm:
    """``tqdm(iterable, **kwargs)`` writing to ``file`` (default stderr): a live bar on a terminal
    or in a notebook, otherwise one line every :data:`LINE_INTERVAL` seconds."""
    stream = file if file is not None else sys.stderr
    if auto_tqdm is not plain_tqdm and file is None:  # a notebook: tqdm.auto draws a widget
        return auto_tqdm(iterable, **kwargs)
    if _is_terminal(stream):
        return plain_tqdm(iterable, file=stream, **kwargs)
    interval = float(os.environ.get("SAFEFLOW_PROGRESS_INTERVAL", LINE_INTERVAL))
    return plain_tqdm(iterable, file=LineWriter(stream), mininterval=interval, maxinterval=max(interval, 10.0),
                      dynamic_ncols=False, ncols=100, **kwargs)
