"""TabPFN v1 in mpqat: fetch the pretrained checkpoint, run it in-context, quantize it, pack it.

* :mod:`~mpqat.tabpfn.fetch`: ``mpqat data fetch tabpfn-v1`` (PyPI source archive of ``tabpfn==0.1``,
  sha256-checked, cached under the mpqat data directory);
* :mod:`~mpqat.tabpfn.model`: the architecture (separate q/k/v/out ``nn.Linear``) and the strict,
  ``weights_only`` checkpoint loader;
* :mod:`~mpqat.tabpfn.incontext`: preprocessing, ensembling, :class:`InContextClassifier`;
* :mod:`~mpqat.tabpfn.quant`: :func:`quantize_tabpfn` (weights+activations or weights only);
* :mod:`~mpqat.tabpfn.finetune`: episodic QAT fine-tuning with any method's hooks (NMP-QAT, uniform);
* :mod:`~mpqat.tabpfn.pack`: bit-packed file of the quantized model, exact round trip;
* :mod:`~mpqat.tabpfn.run`: ``mpqat train --model tabpfn-v1`` run folders.

Guide and results: ``docs/tabpfn.md``, ``benchmarks/tabpfn/``.

Example::

    >>> from mpqat.tabpfn import InContextClassifier, load_tabpfn   # doctest: +SKIP
    >>> InContextClassifier(load_tabpfn(), n_ensemble=4).fit(X_train, y_train).score(X_test, y_test)  # doctest: +SKIP
    0.9649...
"""

from mpqat.tabpfn.incontext import InContextClassifier, OrdinalFromOneHot
from mpqat.tabpfn.model import TabPFN, TabPFNConfig, load_tabpfn

__all__ = ["InContextClassifier", "OrdinalFromOneHot", "TabPFN", "TabPFNConfig", "load_tabpfn"]
