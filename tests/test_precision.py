import pytest
import torch

from clipcid.errors import ClipcidError
from clipcid.util import precision


def test_aliases_map_to_one_name_per_dtype():
    assert precision.canonical("amp_bf16") == precision.canonical("bf16") == "bf16"
    assert precision.canonical("amp") == "fp16"
    assert precision.canonical("fp32") == "fp32"


def test_unknown_precision_is_a_one_line_error():
    with pytest.raises(ClipcidError, match="--precision must be one of .*not 'int8'"):
        precision.canonical("int8")


def test_autocast_changes_matmul_dtype_only_when_asked():
    a = torch.randn(4, 4)
    with precision.autocast(torch.device("cpu"), "fp32"):
        assert (a @ a).dtype == torch.float32
    with precision.autocast(torch.device("cpu"), "amp_bf16"):
        assert (a @ a).dtype == torch.bfloat16


def test_grad_scaler_only_for_fp16_on_cuda():
    assert precision.needs_grad_scaler("amp", torch.device("cuda", 0))
    assert not precision.needs_grad_scaler("fp16", torch.device("cpu"))
    assert not precision.needs_grad_scaler("bf16", torch.device("cuda", 0))
