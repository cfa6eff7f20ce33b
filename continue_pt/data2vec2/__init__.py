"""data2vec 2.0's continued pre-training (in progress): the EMA teacher's schedule and update (``ema``) and the
targets and regression loss (``objective``), as plain functions equal to fairseq's. The LightningModule, options and
the family-table entry come next. Importing the package imports nothing else."""
