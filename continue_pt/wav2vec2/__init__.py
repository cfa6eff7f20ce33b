"""wav2vec 2.0's continued pre-training: the contrastive objective (``objective``), its LightningModule
(``module``) and its options (``options``). Importing the package imports nothing else."""
