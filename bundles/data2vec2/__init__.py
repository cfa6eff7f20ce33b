"""data2vec 2.0 (fairseq ``data2vec_multi``, audio) as plain torch modules: no torchaudio, no fairseq.

* :mod:`.config`: the bundle's ``encoder_args`` / ``pretrain_args`` as typed dataclasses.
* :mod:`.model`: the modules (conv front end, grouped-conv positional encoder, ALiBi blocks, prenet, ``Decoder1d``)
  and the models: :class:`~.model.Data2Vec2Model` (the encoder, with the CTC layer for fine-tuned bundles; the same
  ``forward`` / ``extract_features`` as torchaudio's ``Wav2Vec2Model``) and :class:`~.model.Data2Vec2PretrainModel`
  (student, decoder and EMA teacher).
* :mod:`.factory`: builds them on the meta device for strict assign loading.
"""
