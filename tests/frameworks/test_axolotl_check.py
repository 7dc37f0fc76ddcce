"""anon_hf/integrations/axolotl.py without axolotl: the config check and the wrapper the import hook installs.

The end-to-end check (a typo stops `axolotl train` at config validation) is in test_axolotl.py.
"""

from __future__ import annotations

import types

import pytest

from anon_hf.integrations.axolotl import check_axolotl_config, on_axolotl_config_imported


@pytest.mark.parametrize("optimizer", ["anon", "anon_8bit"])
def test_a_bad_key_or_value_raises_naming_it(optimizer):
    with pytest.raises(ValueError, match=rf"Invalid optim_args for optim='{optimizer}': unknown key 'gama'"):
        check_axolotl_config({"optimizer": optimizer, "optim_args": {"gama": 1.1}})
    with pytest.raises(ValueError, match=r"gamma='x' is not valid"):
        check_axolotl_config({"optimizer": optimizer, "optim_args": "gamma=x"})


def test_good_args_and_other_optimizers_pass():
    check_axolotl_config({"optimizer": "anon", "optim_args": {"gamma": 1.1, "decoupled_weight_decay": True}})
    check_axolotl_config({"optimizer": "anon"})
    check_axolotl_config({"optimizer": "adamw_torch", "optim_args": {"gama": 1}})  # not ours to judge


def test_the_hook_checks_what_validate_config_returns():
    def validate_config(cfg, capabilities=None):
        return dict(cfg, validated=True)

    module = types.SimpleNamespace(validate_config=validate_config)
    on_axolotl_config_imported(module)
    on_axolotl_config_imported(module)
    assert module.validate_config.__wrapped__ is validate_config  # wrapped once
    assert module.validate_config({"optimizer": "anon"}) == {"optimizer": "anon", "validated": True}
    with pytest.raises(ValueError, match="unknown key 'gama'"):
        module.validate_config({"optimizer": "anon", "optim_args": {"gama": 1.1}})
