"""Known-harmless third-party notices are silenced by their exact text; every other warning still shows."""
import logging
import warnings

from distssl.notices import silence_known_notices


def test_only_the_known_notices_are_silenced(caplog):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_known_notices()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Use ...", FutureWarning)
        warnings.warn("something a user can act on", FutureWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated", UserWarning)  # other category
    assert [str(w.message) for w in seen] == ["something a user can act on",
                                              "`torch.distributed.all_gather_into_tensor` is deprecated"]
    ds = logging.getLogger("DeepSpeed")
    with caplog.at_level(logging.WARNING, logger="DeepSpeed"):
        ds.warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
        ds.warning("a DeepSpeed warning about something else")
    assert [r.getMessage() for r in caplog.records] == ["a DeepSpeed warning about something else"]
