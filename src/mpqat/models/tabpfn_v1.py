"""TabPFN v1 (pretrained tabular in-context transformer): a re-export of :mod:`mpqat.tabpfn`.

Example::

    >>> from mpqat.models.tabpfn_v1 import InContextClassifier, load_tabpfn   # doctest: +SKIP
    >>> clf = InContextClassifier(load_tabpfn()).fit(X_train, y_train)        # doctest: +SKIP
"""

from mpqat.tabpfn.incontext import InContextClassifier, OrdinalFromOneHot
from mpqat.tabpfn.model import TabPFN, TabPFNConfig, load_state_dict_strict, load_tabpfn, read_checkpoint

__all__ = ["InContextClassifier", "OrdinalFromOneHot", "TabPFN", "TabPFNConfig", "load_state_dict_strict",
           "load_tabpfn", "read_checkpoint"]
