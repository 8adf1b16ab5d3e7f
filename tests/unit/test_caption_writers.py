"""Caption writers: the registry, the validator, and the llm writer with a tiny local Llama (no hub)."""

from __future__ import annotations

import pytest

from dermaflux.caption.config import CaptionConfig
from dermaflux.lesion.attributes import LesionAttributes
from dermaflux.lesion.captions import caption_from_attributes
from dermaflux.caption.validate import caption_problems
from dermaflux.caption.writers import WRITERS, CaptionRequest, create_writer

MEL = LesionAttributes(diagnosis="mel", asymmetry=0.4, border_irregularity=0.7, colours=["dark_brown", "black"])
NV = LesionAttributes(diagnosis="nv", asymmetry=0.02, border_irregularity=0.1, colours=["light_brown"])


def requests():
    return [CaptionRequest("a", MEL, seed=1), CaptionRequest("b", NV, seed=2), CaptionRequest("c", MEL, seed=3)]


def test_writers_by_name():
    assert {"template", "llm"} <= set(WRITERS)
    with pytest.raises(ValueError, match="caption.writer: unknown writer 'gpt'.*known: llm, template"):
        create_writer(CaptionConfig(writer="gpt"))
    out = create_writer(CaptionConfig()).write(requests())
    assert [r.writer for r in out] == ["template"] * 3 and all(not r.flags for r in out)
    assert out[0].caption == caption_from_attributes(MEL, 1)


@pytest.mark.parametrize(
    "text, attrs, problem",
    [
        ("This photo depicts a malignant lesion (melanoma). It is symmetric.", MEL, "contradicts_asymmetry"),
        ("A melanoma, malignant, with a smooth regular border.", MEL, "contradicts_border"),
        ("A melanocytic nevus, benign, asymmetric in shape.", NV, "contradicts_asymmetry"),
        ("A melanocytic nevus, benign, with an irregular notched border.", NV, "contradicts_border"),
        ("A benign melanoma.", MEL, "contradicts_malignancy"),
        ("A malignant lesion with black dots.", MEL, "missing_diagnosis"),
        ("A melanocytic nevus, benign, with blue-grey and red areas.", NV, "contradicts_colours"),
        ("A melanoma, malignant. " + "Pigment network. " * 200, MEL, "too_long"),
        ("   ", MEL, "empty"),
    ],
)
def test_validator_names_the_problem(text, attrs, problem):
    assert problem in caption_problems(text, attrs)


def test_validator_passes_consistent_text():
    good = "This photo depicts a malignant lesion (melanoma). It is asymmetric, with an irregular border, black and dark brown."
    assert caption_problems(good, MEL) == []
    for seed in range(20):  # the template never contradicts its own attributes
        assert caption_problems(caption_from_attributes(MEL, seed), MEL) == []
        assert caption_problems(caption_from_attributes(NV, seed), NV) == []


@pytest.fixture(scope="module")
def llm_writer(dermaflux_cache):
    return create_writer(CaptionConfig(writer="llm", model="builtin:tiny-llama", max_new_tokens=12))


def test_llm_writer_tiny_model_writes_validated_captions(llm_writer):
    out = llm_writer.write(requests())
    assert [r.writer for r in out] == ["llm"] * 3, [r.flags for r in out]
    assert out[0].caption.startswith("This photo depicts a malignant lesion (melanoma). Here's a description of the mole:")
    assert out[1].caption.startswith("This photo depicts a benign lesion (melanocytic nevus).")
    continuation = out[0].caption.split("mole:", 1)[1].split()
    assert 1 <= len(continuation) <= 12  # the model's own words, within max_new_tokens
    assert llm_writer.write(requests()) == out  # greedy: reproducible


def test_llm_bad_outputs_fall_back_to_the_template(llm_writer):
    base = llm_writer.cfg
    try:
        # Past the caption budget: the babbling tiny model cannot stop in time.
        llm_writer.cfg = base.model_copy(update={"max_new_tokens": 80, "max_caption_tokens": 64})
        out = llm_writer.write(requests()[:1])
        assert out[0].writer == "template" and "llm_fallback:too_long" in out[0].flags
        assert out[0].caption == caption_from_attributes(MEL, 1)
        # Prompts are data: a prefix that drops the diagnosis yields captions that fail validation.
        prompts = base.prompts.model_copy(update={"answer_prefix": "Here's a description of the mole:"})
        llm_writer.cfg = base.model_copy(update={"prompts": prompts})
        out = llm_writer.write(requests())
        assert all(r.writer == "template" and "llm_fallback:missing_diagnosis" in r.flags for r in out)
    finally:
        llm_writer.cfg = base


def test_prompts_with_unknown_placeholders_fail_at_config_time():
    from dermaflux.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"caption.prompts.answer_prefix.*unknown placeholder\(s\) \['label'\]"):
        load_config("tiny", overrides=["caption.prompts.answer_prefix=A {label} lesion."])


def test_actor_pool_that_would_starve_extraction_is_refused():
    from dermaflux.caption.ray_pipeline import _check_cpus

    _check_cpus(CaptionConfig(concurrency=1), 2.0)
    with pytest.raises(ValueError, match=r"caption.concurrency \(2\) x caption.cpus_per_actor \(1.0\).*cluster has 2.0"):
        _check_cpus(CaptionConfig(concurrency=2), 2.0)


def test_llm_writer_vision_path_with_a_tiny_llava(dermaflux_cache, ham10000_dir):
    image = next((ham10000_dir / "images").glob("*.jpg")).read_bytes()
    cfg = CaptionConfig(writer="llm", vision=True, vision_model="builtin:tiny-llava", max_new_tokens=6)
    writer = create_writer(cfg)
    batch = [CaptionRequest("a", MEL, seed=1, image=image), CaptionRequest("b", NV, seed=2, image=image)]
    out = writer.write(batch)
    assert [r.writer for r in out] == ["llm", "llm"], [r.flags for r in out]
    assert out[1].caption.startswith("This photo depicts a benign lesion (melanocytic nevus). Here's a description")
    assert len(out[0].caption.split("mole:", 1)[1].split()) >= 1
