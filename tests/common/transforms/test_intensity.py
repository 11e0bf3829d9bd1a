import numpy as np
import torch

from common.transforms.intensity import RandInvertIntensityd


def test_invert_applies_same_draw_to_all_keys():
    data = {"a": torch.full((1, 2, 2), 55.0), "b": torch.full((1, 2, 2), 5.0)}
    always = RandInvertIntensityd(keys=["a", "b"], prob=1.0, max_value=255.0)
    out = always(data)
    assert torch.all(out["a"] == 200) and torch.all(out["b"] == 250)
    never = RandInvertIntensityd(keys=["a", "b"], prob=0.0)
    assert torch.equal(never(data)["a"], data["a"])


def test_invert_probability_is_respected():
    transform = RandInvertIntensityd(keys="a", prob=0.5).set_random_state(seed=0)
    inverted = [bool(transform({"a": np.zeros(1)})["a"][0] == 255) for _ in range(400)]
    assert 0.4 < np.mean(inverted) < 0.6
