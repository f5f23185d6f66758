"""uqlora: uncertainty estimation for LoRA-fine-tuned language models.

The Python API (:mod:`uqlora.api`, documented in ``docs/adapters.md``) for use outside ``train.py`` /
``eval.py``::

    from uqlora import load_backbone, load_data, Laplace, Temperature, SWAG

Its names are imported on first use, so ``import uqlora.<module>`` stays as light as that module.
"""
__all__ = ["load_backbone", "load_data", "to_batch", "as_batch", "compose", "Method", "make_method", "MAP", "Laplace", "LLLA",
           "Temperature", "AdUE", "SWAG", "MCDropout"]


def __getattr__(name):
    if name in __all__:
        from uqlora import api

        return getattr(api, name)
    raise AttributeError(f"module 'uqlora' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
