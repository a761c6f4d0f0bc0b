"""The one place where third-party notices that a distssl user cannot act on are silenced, each by its
exact text (every other warning, ours and theirs, still shows)."""
from __future__ import annotations

import logging
import warnings

# (category, message regex, why it does not apply)
KNOWN_HARMLESS = [
    (UserWarning, r".*TypedStorage is deprecated", "raised inside torch.load/DeepSpeed, not by our calls"),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
     "DeepSpeed's ZeRO calls it; nothing in the run's config changes that"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated", "likewise, ZeRO's reduce"),
]
# DeepSpeed's log lines, by text: ZeRO wraps any torch optimizer; the ones distssl builds (timm's
# element-wise optimizers) are tested under ZeRO-2/3 in tests/test_optimizers.py, and per-tensor ones
# (LAMB, ...) are refused on partitions by the config check
DEEPSPEED_LINES = ("untested optimizer",)


class _DropLines(logging.Filter):
    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(t in record.getMessage() for t in self.texts)


def silence_known_notices() -> None:
    for category, message, _why in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category)
    deepspeed_log = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropLines) for f in deepspeed_log.filters):
        deepspeed_log.addFilter(_DropLines(DEEPSPEED_LINES))
