"""HuBERT's continued pre-training: the masked-prediction objective (``objective``), its LightningModule
(``module``) and its options (``options``). Importing the package imports nothing else."""
