from __future__ import annotations

import logging

import pytest
import torch

from common.data.wsi import list_slides
from common.engines.batch import BatchFailedError, run_batch
from common.errors import InputDataError
from common.inferers.wsi import WholeSlideSegmenter
from tests.common.data.test_wsi import slide_pixels, write_slide

pytestmark = pytest.mark.usefixtures("one_thread")


def test_failures_are_logged_and_reported_and_the_rest_goes_on(caplog):
    def process(item: str) -> str:
        if item == "bad":
            raise RuntimeError("wrapped by a config") from InputDataError("bad.svs", "truncated file")
        return item.upper()

    with caplog.at_level(logging.INFO, logger="common.engines.batch"):
        report = run_batch(
            ["a", "bad", "done", "c"], process, lambda item: item == "done", raise_on_failure=False
        )
    assert report.results == ["A", "C"] and report.skipped == ["done"]
    assert report.failed == {"bad": "truncated file"}  # the InputDataError behind the wrapper
    assert "bad: failed, going on with the next input: truncated file" in caplog.text
    assert "2 processed, 1 skipped (outputs complete), 1 failed" in caplog.text


def test_a_folder_with_a_truncated_slide_between_good_ones(tmp_path):
    """The good slides are written, the truncated one is in the summary and the exit status (an
    exception) is an error; a rerun skips the finished slides and fails on the bad one again."""
    folder = tmp_path / "slides"
    for name, seed in (("a", 0), ("b_truncated", 1), ("c", 2)):
        write_slide(folder / f"{name}.tif", slide_pixels(256, 192, seed=seed), levels=2, tile_size=64)
    bad = folder / "b_truncated.tif"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    segmenter = WholeSlideSegmenter(
        torch.nn.Conv2d(3, 5, 1), tmp_path / "out", 5, patch_size=128, tile_size=64
    )
    with pytest.raises(
        BatchFailedError, match=r"2 processed, 0 skipped \(outputs complete\), 1 failed"
    ) as raised:
        run_batch(list_slides(folder), segmenter, segmenter.is_done)
    report = raised.value.report
    assert [summary["slide"] for summary in report.results] == [str(folder / "a.tif"), str(folder / "c.tif")]
    assert list(report.failed) == [str(bad)] and "could not be read" in report.failed[str(bad)]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(
        f"{s}_{kind}" for s in "ac" for kind in ("areas.json", "classes.tif", "overlay.png")
    )
    with pytest.raises(BatchFailedError) as again:
        run_batch(list_slides(folder), segmenter, segmenter.is_done)
    assert again.value.report.skipped == [str(folder / "a.tif"), str(folder / "c.tif")]
    assert list(again.value.report.failed) == [str(bad)] and again.value.report.results == []


def test_an_evaluator_over_a_folder_skips_a_corrupt_image_and_fails_at_the_end(tmp_path, caplog):
    from ignite.engine import Events
    from monai.data import Dataset
    from monai.engines import SupervisedEvaluator
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
    from PIL import Image

    from common.data.datalist import image_datalist
    from common.engines.batch import fail_safe_loader, pending
    from common.errors import find_input_data_error

    for name in ("a", "c", "d"):
        Image.new("RGB", (16, 16), (200, 60, 60)).save(tmp_path / f"{name}.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "d_overlay.png").write_bytes(b"done")  # d finished in an earlier run
    with caplog.at_level(logging.INFO, logger="common.engines.batch"):
        datalist = pending(image_datalist(tmp_path), tmp_path / "out", ["{stem}_overlay.png"])
    assert [entry["image"] for entry in datalist] == [str(tmp_path / f"{n}.png") for n in "abc"]
    assert datalist.skipped == [str(tmp_path / "d.png")] and "d.png: outputs complete, skipped" in caplog.text
    redo = pending(image_datalist(tmp_path), tmp_path / "out", ["{stem}_overlay.png"], overwrite=True)
    assert len(redo) == 4 and redo.skipped == []
    with pytest.raises(ValueError, match="at least one file"):
        pending(image_datalist(tmp_path), tmp_path / "out", [])
    transform = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])
    batches = fail_safe_loader(Dataset(datalist, transform), batch_size=2)
    evaluator = SupervisedEvaluator("cpu", batches, torch.nn.Identity())
    seen: list[str] = []
    evaluator.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: seen.extend(item["image"].meta["filename_or_obj"] for item in e.state.batch),
    )
    evaluator.run()
    assert seen == [str(tmp_path / "a.png"), str(tmp_path / "c.png")]  # b dropped from its batch, c went on
    with pytest.raises(
        BatchFailedError, match=r"2 processed, 1 skipped \(outputs complete\), 1 failed"
    ) as raised:
        batches.raise_if_failed()
    bad = str(tmp_path / "b.png")
    assert list(raised.value.report.failed) == [bad]
    assert "applying transform" not in raised.value.report.failed[bad]  # the reader's cause
    cause = find_input_data_error(raised.value)  # what MONAI Label's 422 and the excepthook show
    assert cause is raised.value.__cause__ and cause.path == bad
    assert cause.problem == raised.value.report.failed[bad]


def test_a_run_where_every_input_is_done_or_failed_ends_cleanly(tmp_path, caplog):
    """No batch at all (everything skipped, or the one image unreadable) is not an error of its own."""
    from monai.data import Dataset
    from monai.engines import SupervisedEvaluator
    from monai.transforms import LoadImaged

    from common.engines.batch import fail_safe_loader

    (tmp_path / "bad.png").write_bytes(b"not an image")
    for entries, failed in (([], 0), ([{"image": str(tmp_path / "bad.png")}], 1)):
        batches = fail_safe_loader(Dataset(entries, LoadImaged("image")))
        SupervisedEvaluator("cpu", batches, torch.nn.Identity()).run()
        assert batches.report.processed == 0 and len(batches.report.failed) == failed
    with pytest.raises(BatchFailedError):
        batches.raise_if_failed()
    empty = fail_safe_loader(Dataset([], LoadImaged("image")))
    with caplog.at_level(logging.INFO, logger="common.engines.batch"):
        empty.raise_if_failed()  # nothing failed: only the summary
    assert "batch: 0 processed, 0 skipped (outputs complete), 0 failed" in caplog.text
