"""Training options for a generator that follows its prompt: caption styles (train and sampling alike) and
caption dropout (a share of the sample stream trained with the empty prompt, a function of the position)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dermaflux.lesion.attributes import DIAGNOSIS_NAMES, LesionAttributes
from dermaflux.lesion.captions import caption_from_attributes
from dermaflux.train.cache import micro_batch_dropped, micro_batch_indices, sample_dropped, sample_views
from dermaflux.train.prompts import diagnosis_in, sampling_prompt, training_prompt


@pytest.mark.parametrize("code", sorted(DIAGNOSIS_NAMES))
def test_every_wording_of_a_diagnosis_reads_back_as_its_code(code):
    for wording in DIAGNOSIS_NAMES[code]:
        assert diagnosis_in(f"A dermoscopic image of a {wording}, benign, with a smooth border.") == code
        assert diagnosis_in(wording.upper()) == code


@pytest.mark.parametrize("code", sorted(DIAGNOSIS_NAMES))
def test_template_captions_style_to_their_diagnosis_for_training_and_sampling(code):
    for seed in range(12):  # every opener and wording of the template
        attrs = LesionAttributes(diagnosis=code, colours=["dark_brown"], asymmetry_axes=1, site="back")
        caption = caption_from_attributes(attrs, seed)
        assert training_prompt(caption, code, "diagnosis") == DIAGNOSIS_NAMES[code][0]
        assert sampling_prompt(caption, "diagnosis") == DIAGNOSIS_NAMES[code][0]
        assert training_prompt(caption, code, "caption") == sampling_prompt(caption, "caption") == caption


def test_the_first_diagnosis_named_wins_and_words_inside_other_words_do_not_count():
    assert diagnosis_in("a melanoma, not a melanocytic nevus") == "mel"
    assert diagnosis_in("a melanocytic nevus, not a melanoma") == "nv"
    assert diagnosis_in("seborrheic keratosis-like benign keratosis") == "bkl"
    assert diagnosis_in("nevuses and melanomas") is None  # no whole wording
    assert diagnosis_in("a pigmented lesion") is None


def test_a_prompt_without_a_diagnosis_samples_unconditionally_and_trains_only_with_a_label():
    assert sampling_prompt("a pigmented lesion on the back", "diagnosis") == ""
    assert training_prompt("a pigmented lesion on the back", "df", "diagnosis") == "dermatofibroma"
    assert training_prompt("a melanoma on the back", None, "diagnosis") == "melanoma"
    with pytest.raises(ValueError, match="no label and its caption names no diagnosis"):
        training_prompt("a pigmented lesion", None, "diagnosis")
    with pytest.raises(ValueError, match="expected one of caption, diagnosis"):
        training_prompt("a melanoma", "mel", "keywords")


def test_caption_style_is_a_train_field(tiny_config):
    from dermaflux.config import load_config
    from dermaflux.core.config import ConfigError

    cfg = load_config("tiny", overrides=["train.caption_style=diagnosis", "train.caption_dropout=0.1"])
    assert (cfg.train.caption_style, cfg.train.caption_dropout) == ("diagnosis", 0.1)
    with pytest.raises((ConfigError, ValueError), match="caption_style"):
        load_config("tiny", overrides=["train.caption_style=keywords"])
    with pytest.raises((ConfigError, ValueError), match="caption_dropout"):
        load_config("tiny", overrides=["train.caption_dropout=1.0"])


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
def test_dropout_rate_is_observed_in_the_sample_stream(rate):
    dropped = sample_dropped(1000, seed=3, start=0, count=20_000, rate=rate)
    assert dropped.dtype == bool
    assert abs(dropped.mean() - rate) < 0.015
    # every row is dropped in some epochs and kept in others: not a fixed subset of the data
    per_row = dropped.reshape(20, 1000).mean(axis=0)
    assert (per_row > 0).mean() > 0.8 and (per_row < 1).all()


def test_dropout_stream_is_a_function_of_the_position():
    whole = sample_dropped(10, seed=3, start=0, count=57, rate=0.3)
    pieces = np.concatenate([sample_dropped(10, 3, s, min(7, 57 - s), 0.3) for s in range(0, 57, 7)])
    assert np.array_equal(whole, pieces)  # a resumed run drops the same samples
    assert not np.array_equal(whole, sample_dropped(10, 4, 0, 57, 0.3))
    assert not sample_dropped(10, 3, 0, 57, 0.0).any()
    # independent of the views and of the permutation drawn from the same seed
    views = sample_views(10, 3, 0, 2000, 8)
    drops = sample_dropped(10, 3, 0, 2000, 0.5)
    assert abs(views[drops].mean() - views[~drops].mean()) < 0.4
    steps = [micro_batch_dropped(10, 3, step, rank, 2, 3, 0.3) for step in range(3) for rank in range(2)]
    assert np.array_equal(np.concatenate(steps), whole[:18])
    assert len(micro_batch_indices(10, 3, 0, 0, 2, 3)) == len(steps[0])


@pytest.fixture(scope="module")
def styled_rows(tmp_path_factory, ham10000_dir, tiny_config):
    """Four real captioned HAM10000 rows encoded in both styles, as the pre-compute writes them."""
    from dermaflux.testing.ham10000 import build_captioned_set
    from dermaflux.train.precompute import CAPTION_COLUMNS, caption_shards, encode_rows, load_text_and_vae

    torch.set_num_threads(1)
    captions = build_captioned_set(ham10000_dir, tmp_path_factory.mktemp("styled"), n_train=4, n_test=0)
    source = pa.concat_tables([pq.read_table(p, columns=CAPTION_COLUMNS) for p in caption_shards(captions)]).to_pydict()
    pipe = load_text_and_vae(tiny_config.model, None)
    return pipe, source, {style: encode_rows(pipe, source, 64, 32, caption_style=style) for style in ("caption", "diagnosis")}


def test_precompute_encodes_the_styled_prompt(styled_rows):
    from dermaflux.train.cache import bytes_to_tensor
    from dermaflux.train.encode import encode_captions

    pipe, source, rows = styled_rows
    assert rows["caption"]["caption"] == source["caption"]
    names = [DIAGNOSIS_NAMES[label][0] for label in source["label"]]
    assert rows["diagnosis"]["caption"] == names
    embeds, pooled = encode_captions(pipe, names, 32)
    for i, blob in enumerate(rows["diagnosis"]["pooled_prompt_embeds"]):
        cached = bytes_to_tensor(blob, rows["diagnosis"]["pooled_prompt_embeds_shape"][i], rows["diagnosis"]["dtype"][i])
        assert torch.equal(cached, pooled[i])
    # the two styles differ in what the transformer is conditioned on, not in the images
    assert rows["diagnosis"]["latents"] == rows["caption"]["latents"]
    assert rows["diagnosis"]["prompt_embeds"] != rows["caption"]["prompt_embeds"]


def test_an_empty_caption_is_named(styled_rows):
    from dermaflux.train.precompute import styled_captions

    _, source, _ = styled_rows
    broken = {**source, "caption": [source["caption"][0], "  "] + source["caption"][2:]}
    with pytest.raises(ValueError, match=f"caption row {source['id'][1]}: empty caption"):
        styled_captions(broken, "diagnosis")


def test_guidance_is_applied_as_the_adapter_was_trained():
    from dermaflux.synth.sampling import guidance_arguments

    distilled = {"caption_style": "caption", "sampling_guidance": "embedding", "train_guidance": 1.0}
    assert guidance_arguments(distilled, 3.5, 2) == {"guidance_scale": 3.5}
    unconditional_learned = {**distilled, "sampling_guidance": "true_cfg", "train_guidance": 1.0}
    assert guidance_arguments(unconditional_learned, 3.5, 2) == {
        "guidance_scale": 1.0, "true_cfg_scale": 3.5, "negative_prompt": ["", ""]}


def test_true_cfg_needs_caption_dropout():
    from dermaflux.config import load_config
    from dermaflux.core.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="true_cfg needs caption_dropout"):
        load_config("tiny", overrides=["train.sampling_guidance=true_cfg"])
    cfg = load_config("tiny", overrides=["train.sampling_guidance=true_cfg", "train.caption_dropout=0.2"])
    assert cfg.train.sampling_guidance == "true_cfg"


def test_the_demo_trains_a_conditioned_generator():
    """presets/tiny.yaml gives `dermaflux pipeline` the settings bench/conditioning.py chose (issue 13)."""
    from dermaflux.config import load_config
    from dermaflux.pipeline import plan

    cfg = load_config("tiny", overrides=["pipeline.out=/tmp/dfx-plan-only", "pipeline.stages=[train]",
                                         "train.captions=/tmp/dfx-plan-only/captions"])
    train = plan(cfg).cfg.train
    assert (train.caption_style, train.sampling_guidance) == ("diagnosis", "true_cfg")
    assert train.caption_dropout > 0 and train.logit_mean > 0 and train.steps >= 1000
    assert load_config("tiny").train.caption_style == "caption"  # a single-stage run keeps the stage defaults
