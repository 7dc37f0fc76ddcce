"""anon-hf's start-up hook for the processes ``anon-hf run`` starts (see ``anon_hf/_startup.py``).

``anon-hf run`` puts this folder first on ``PYTHONPATH`` and sets ``ANON_HF_AUTO_REGISTER=1``; Python imports this
file at start-up in every child interpreter. It loads ``_startup.py`` by path (standard library only, no torch),
installs the trigger that imports anon_hf when transformers or DeepSpeed is first imported, and then runs the
``sitecustomize`` it shadows, if there is one.
"""


def _anon_hf_startup() -> None:
    import os
    from importlib.util import module_from_spec, spec_from_file_location

    here = os.path.dirname(os.path.abspath(__file__))
    spec = spec_from_file_location("_anon_hf_startup", os.path.join(os.path.dirname(here), "_startup.py"))
    startup = module_from_spec(spec)
    spec.loader.exec_module(startup)
    try:
        startup.install(default=False)
    finally:
        startup.chain_sitecustomize(here)


_anon_hf_startup()
del _anon_hf_startup
