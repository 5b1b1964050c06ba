"""``llmkd quickstart``: an offline, CPU-sized demonstration of distillation against plain SFT.

The task (:mod:`.task`), the held-out evaluation (:mod:`.evaluate`), and the run itself (:mod:`.run`).
"""

from .run import main

__all__ = ["main"]
