from __future__ import annotations

import pytest
import torch

from sglang_ext.dspark.config import DSparkConfig
from toy import toy_config

torch.set_num_threads(1)


@pytest.fixture
def cfg() -> DSparkConfig:
    return toy_config()
