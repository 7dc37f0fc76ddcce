"""TRL's configs subclass TrainingArguments: ``optim="anon"`` and its ``optim_args`` check work through them too."""

import pytest

from anon_hf import Anon
from anon_hf.integrations.import_utils import package_version

pytestmark = pytest.mark.skipif(
    not package_version("trl"), reason="trl is not installed (it comes with pip install -e '.[test]')"
)


@pytest.mark.parametrize("config_name", ["SFTConfig", "DPOConfig"])
def test_trl_config_takes_optim_anon_and_checks_optim_args(tmp_path, config_name):
    import trl
    from transformers import Trainer

    config_cls = getattr(trl, config_name)
    common = dict(output_dir=str(tmp_path), optim="anon", report_to="none", use_cpu=True)
    config = config_cls(**common, optim_args="gamma=0.5,refresh=every")
    assert config.optim.value == "anon"
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(config)
    assert optimizer_cls is Anon and (kwargs["gamma"], kwargs["refresh"]) == (0.5, "every")
    with pytest.raises(ValueError, match=r"Invalid optim_args for optim='anon': unknown key 'gama'"):
        config_cls(**common, optim_args="gama=1")
