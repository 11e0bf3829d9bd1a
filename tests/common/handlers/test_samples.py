import torch
from ignite.engine import Engine

from common.handlers.samples import gather_by_name, iteration_samples, sample_name


def _engine(output, batch):
    engine = Engine(lambda e, b: None)
    engine.state.output, engine.state.batch = output, batch
    return engine


def test_output_entries_are_completed_by_the_batch_and_win_on_conflicts():
    engine = _engine([{"pred": 1, "label": "output"}, {"pred": 2, "label": "output"}],
                     [{"label": "batch", "name": "a"}, {"label": "batch", "name": "b"}])
    assert iteration_samples(engine) == [{"pred": 1, "label": "output", "name": "a"},
                                         {"pred": 2, "label": "output", "name": "b"}]


def test_batched_dicts_are_decollated():
    engine = _engine({"pred": torch.tensor([[1.0], [2.0]])}, {"name": ["a", "b"]})
    samples = iteration_samples(engine)
    assert [s["name"] for s in samples] == ["a", "b"] and float(samples[1]["pred"][0]) == 2.0


def test_sample_name_prefers_the_name_then_the_image_file():
    from monai.data import MetaTensor


    image = MetaTensor(torch.zeros(1, 2, 2), meta={"filename_or_obj": "/data/a.png"})
    assert sample_name({"name": "b.png", "image": image}) == "b.png"
    assert sample_name({"image": image}) == "/data/a.png"
    assert sample_name({"image": torch.zeros(1)}) is None


def test_gather_by_name_keeps_the_first_record_of_each_name():
    records = [("a.png", 1), ("b.png", 2), ("a.png", 3)]  # a.png repeated, as DistributedSampler pads
    assert gather_by_name(records, lambda record: record[0]) == {"a.png": ("a.png", 1), "b.png": ("b.png", 2)}
    assert gather_by_name([], lambda record: record[0]) == {}


def test_sample_name_numbers_unnamed_samples_by_rank_and_position():
    assert sample_name({"image": torch.zeros(1)}) is None
    assert sample_name({"image": torch.zeros(1)}, position=3) == "rank0_image3"
    assert sample_name({"name": "a.png"}, position=3) == "a.png"
