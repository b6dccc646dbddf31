"""runtime.Runtime: "auto" resolved into the runtime's own attributes, the config left as written."""
import pytest
import torch

from configurator import UserError
from runtime import Runtime, measure_peak_flops


def test_auto_resolved_and_config_untouched():
    cfg = dict(device="auto", dtype="auto", other=1)
    rt = Runtime(cfg)
    assert cfg == dict(device="auto", dtype="auto", other=1)
    cuda = torch.cuda.is_available()
    assert rt.device == ("cuda" if cuda else "cpu") and rt.device_type == rt.device
    assert rt.dtype == (("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if cuda else "float32")
    assert (rt.rank, rt.world, rt.master, rt.ddp) == (0, 1, True, False)
    assert rt.all_sum(2.0, 3.0) == (2.0, 3.0) and rt.all_mean(5.0) == 5.0


def test_bad_dtype_is_a_user_error():
    with pytest.raises(UserError, match=r"^dtype='fp8': use float32, bfloat16, float16 or auto$"):
        Runtime(dict(device="cpu", dtype="fp8"))


def test_peak_measurement_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    assert measure_peak_flops("cpu", n=64, repeats=1) > 0
    assert torch.equal(torch.get_rng_state(), before)
