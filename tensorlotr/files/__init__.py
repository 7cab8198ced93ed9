"""Safe file primitives that know nothing of adapters: atomic writes, JSON documents, Hub folders.

The bottom layer beside :mod:`tensorlotr.core`; every writer of the package goes through
:mod:`.atomic`, every JSON reader through :mod:`.jsonfile`, every Hub download through :mod:`.hub`.
"""
