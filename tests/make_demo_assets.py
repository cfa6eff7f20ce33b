"""Regenerate the tiny fairseq HuBERT and wav2vec 2.0 checkpoints and the k-means shipped for `continue-pt demo`
(needs fairseq).

    .venv/bin/python -m tests.make_demo_assets            # all
    .venv/bin/python -m tests.make_demo_assets wav2vec2   # only tiny_wav2vec2.pt
    .venv/bin/python -m tests.make_demo_assets data2vec2  # only tiny_data2vec2.pt

The checkpoints are written by fairseq's own model classes and saved as fairseq's trainer saves it (plain-dict
``cfg``, ``task_state`` with the label Dictionary, ``optimizer_history``), with the cluster symbols shuffled in
the dictionary as real label dictionaries can be. The k-means is a real scikit-learn MiniBatchKMeans fitted on
the model's layer-1 features of generated audio and written with joblib, as fairseq's learn_kmeans.py does.
"""

from __future__ import annotations

import random
import joblib
import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.cluster import MiniBatchKMeans

from continue_pt.demo import (
    ASSETS,
    DATA2VEC2_CHECKPOINT,
    DATA2VEC2_NUM_UPDATES,
    KMEANS_LAYER,
    WAV2VEC2_CHECKPOINT,
    demo_audio,
)
from fairseq.data import Dictionary
from fairseq.models.hubert.hubert import HubertConfig, HubertModel
from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

NUM_CLUSTERS = 20

MODEL = dict(
    label_rate=50, extractor_mode="default", encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
    encoder_attention_heads=4, conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2", conv_bias=False,
    conv_pos=16, conv_pos_groups=4, final_dim=32, untie_final_proj=False, layer_norm_first=False,
    feature_grad_mult=0.1, mask_prob=0.8, mask_length=10, logit_temp=0.1, dropout=0.1, attention_dropout=0.1,
    activation_dropout=0.0, encoder_layerdrop=0.0, dropout_input=0.1, dropout_features=0.1,
)
TASK = dict(_name="hubert_pretraining", data="demo", labels=["km"], label_rate=50, sample_rate=16000,
            normalize=False, max_sample_size=250000, min_sample_size=16000, random_crop=True, pad_audio=False)

# wav2vec 2.0 BASE's recipe (wav2vec2_base_librispeech.yaml) at a tiny width; a checkpoint 50k updates into training
# (Gumbel temperature 2 * 0.999995^50000 = 1.56), so a continued run must pick the temperature up from there.
WAV2VEC2_MODEL = dict(
    extractor_mode="default", encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
    encoder_attention_heads=4, conv_feature_layers=MODEL["conv_feature_layers"], conv_bias=False, conv_pos=16,
    conv_pos_groups=4, final_dim=32, latent_vars=16, latent_groups=2, latent_temp=(2.0, 0.5, 0.999995),
    quantize_targets=True, layer_norm_first=False, feature_grad_mult=0.1, mask_prob=0.65, mask_length=10,
    num_negatives=100, cross_sample_negatives=0, logit_temp=0.1, dropout=0.1, attention_dropout=0.1,
    activation_dropout=0.0, encoder_layerdrop=0.05, dropout_input=0.1, dropout_features=0.1,
)
WAV2VEC2_NUM_UPDATES = 50_000


def write_tiny_wav2vec2() -> None:
    torch.manual_seed(1)
    model_cfg = Wav2Vec2Config(**WAV2VEC2_MODEL)
    model = Wav2Vec2Model(model_cfg).eval()
    cfg = {"model": OmegaConf.to_container(OmegaConf.structured(model_cfg), enum_to_str=True) | {"_name": "wav2vec2"},
           "task": {"_name": "audio_pretraining", "data": "demo", "sample_rate": 16000, "normalize": False,
                    "max_sample_size": 250000, "min_sample_size": 32000},
           "criterion": {"_name": "wav2vec", "infonce": True, "loss_weights": [0.1, 10.0],
                         "log_keys": ["prob_perplexity", "code_perplexity", "temp"]}}
    checkpoint = {"cfg": cfg, "model": model.state_dict(),
                  "optimizer_history": [{"criterion_name": "Wav2vecCriterion", "optimizer_name": "FairseqAdam",
                                         "lr_scheduler_state": {"best": None},
                                         "num_updates": WAV2VEC2_NUM_UPDATES}],
                  "task_state": {}, "extra_state": {"epoch": 1}}
    torch.save(checkpoint, WAV2VEC2_CHECKPOINT)


def write_tiny_data2vec2() -> None:
    """data2vec 2.0 BASE's recipe (the stored data2vec2_base_libri config: clone_batch 8, instance-normalised
    top-K targets, ALiBi, conv decoder) at a tiny width, written by fairseq's own Data2VecMultiModel and saved as its
    trainer saves it (teacher under ``model["_ema"]``) at the end of BASE's run (400k updates: the EMA decay has
    annealed to 0.99999, the teacher is nearly frozen)."""
    from tests.data2vec2_reference import (
        build_data2vec2_model,
        load_data2vec2_config,
        save_data2vec2_checkpoint,
        shrunk,
    )

    stored = shrunk(load_data2vec2_config("data2vec2_base_libri"), depth=2, dim=32, heads=2, conv_dim=32,
                    decoder_dim=16)
    ref = build_data2vec2_model("data2vec2_base_libri", seed=3, stored=stored)
    ASSETS.mkdir(parents=True, exist_ok=True)
    save_data2vec2_checkpoint(ref, DATA2VEC2_CHECKPOINT, num_updates=DATA2VEC2_NUM_UPDATES)


def main() -> None:
    torch.manual_seed(0)
    random.seed(0)
    order = list(range(NUM_CLUSTERS))
    random.shuffle(order)
    dictionary = Dictionary()
    for c in order:
        dictionary.add_symbol(str(c))
    model_cfg = HubertConfig(**MODEL)
    task_cfg = HubertPretrainingConfig(labels=["km"], label_rate=50)
    model = HubertModel(model_cfg, task_cfg, [dictionary]).eval()
    cfg = {"model": OmegaConf.to_container(OmegaConf.structured(model_cfg), enum_to_str=True) | {"_name": "hubert"},
           "task": TASK,
           "criterion": {"_name": "hubert", "pred_masked_weight": 1.0, "pred_nomask_weight": 0.0,
                         "loss_weights": [10.0]}}
    checkpoint = {"cfg": cfg, "model": model.state_dict(),
                  "optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam",
                                         "lr_scheduler_state": {"best": None}, "num_updates": 1000}],
                  "task_state": {"dictionaries": [dictionary]}, "extra_state": {"epoch": 1}}
    ASSETS.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, ASSETS / "tiny_hubert.pt")

    with torch.no_grad():
        feats = [model.extract_features(demo_audio(2.0, seed), mask=False, output_layer=KMEANS_LAYER)[0][0]
                 for seed in range(8)]
    feats = torch.cat(feats).numpy().astype(np.float32)
    km = MiniBatchKMeans(n_clusters=NUM_CLUSTERS, batch_size=256, n_init=3, random_state=0).fit(feats)
    joblib.dump(km, ASSETS / "tiny_hubert_L1_km20.bin")
    write_tiny_wav2vec2()
    write_tiny_data2vec2()
    print(f"wrote {ASSETS}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["wav2vec2"]:  # only the wav2vec 2.0 checkpoint (added later; the others stay as shipped)
        write_tiny_wav2vec2()
    elif sys.argv[1:] == ["data2vec2"]:  # only the data2vec 2.0 checkpoint (added later)
        write_tiny_data2vec2()
    else:
        main()
