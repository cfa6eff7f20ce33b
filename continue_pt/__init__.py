"""continue-pt: continue the self-supervised pre-training of published HuBERT / wav2vec 2.0 checkpoints.

The library depends only on ``bundles``; ``continue_pt.cli`` (the ``continue-pt`` command) also calls
``converters`` to read fairseq files.
"""
