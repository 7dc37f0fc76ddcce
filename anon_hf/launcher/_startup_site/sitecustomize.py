"""anon-hf's start-up hook for the processes ``anon-hf run`` starts (see ``anon_hf/launcher/startup.py``).

``anon-hf run`` puts this folder first on ``PYTHONPATH`` and sets ``ANON_HF_AUTO_REGISTER=1``; Python imports this
file at start-up in every child interpreter. It loads ``startup.py`` by path (standard library only, no torch),
installs the trigger that imports anon_hf when transformers or DeepSpeed is first imported, and then runs the
``sitecustomize`` it shadows, if there is one.
"""


def _anon_hf_startup() -> None:
    import os
    import sys
    from importlib.machinery import SourceFileLoader  # not importlib.util: that costs a few ms at start-up

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(os.path.dirname(here), "startup.py")
    startup = type(sys)("_anon_hf_startup")
    startup.__file__ = path
    SourceFileLoader("_anon_hf_startup", path).exec_module(startup)
    try:
        startup.install(default=False)
    finally:
        startup.chain_sitecustomize(here)


_anon_hf_startup()
del _anon_hf_startup
