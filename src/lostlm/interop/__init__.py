"""Interoperability with Hugging Face transformers, one concept per module.

* :mod:`~lostlm.interop.names` — the one ModelConfig ↔ transformers Llama field-name map.
* :mod:`~lostlm.interop.lost_llama` — the ``lost_llama`` model type (config, model, Auto
  registration), wrapping a run (``to_hf``), writing (``save_hf``) and reading folders.
* :mod:`~lostlm.interop.llama_reader` — a local transformers Llama folder as our dense
  LlamaLM, without transformers (``llama_from_pretrained``; the base of ``model.init_from``).
* :mod:`~lostlm.interop.export` — dense export: a plain ``llama`` folder (``save_dense``).
* :mod:`~lostlm.interop.pretrained` — ``lostlm convert-pretrained``.
* :mod:`~lostlm.interop.any_model` — LOST on any transformers causal LM (``convert_for_training``,
  ``save_pretrained`` with ``lost_config.json``, strict ``from_pretrained``).

Weights are checked with :func:`lostlm.weights.load_strict` / ``state_mismatch``. Nothing is
imported here, so ``llama_reader`` (and ``lostlm.build``) work without loading transformers'
model classes; ``import lostlm`` imports ``lost_llama`` to register the Auto classes.
"""
