"""Data sources: the papers' evaluation protocols, mixes of sources, and the offline corpora."""

from pathlib import Path

import pytest
import torch

from apt.errors import InvalidInputError
from apt.text.sources import C4_EVAL_DOCUMENTS, evaluation_documents, load_text, protocol_documents


def test_papers_protocols_build_one_document_in_order():
    rows = [" = Title = ", "", " first paragraph ", " second "]
    assert protocol_documents("wikitext2", rows) == (" = Title = \n\n\n\n first paragraph \n\n second ",)
    many = [f"doc{i}" for i in range(C4_EVAL_DOCUMENTS + 5)]
    (c4,) = protocol_documents("c4", many)
    assert c4.split(" ") == many[:C4_EVAL_DOCUMENTS] and C4_EVAL_DOCUMENTS == 1100
    assert protocol_documents("some/other", ["a", "b"]) == ("a", "b")


needs_licenses = pytest.mark.skipif(
    not Path("/usr/share/common-licenses").is_dir(), reason="no /usr/share/common-licenses on this machine"
)


@needs_licenses
def test_a_mix_is_the_union_of_its_parts_under_one_split():
    stdlib, licenses = load_text("stdlib"), load_text("licenses")
    assert len(licenses.whole) >= 5 and all(doc.strip() for doc in licenses.whole)
    mix = load_text("stdlib+licenses")
    assert mix.calibration == stdlib.calibration + licenses.calibration
    assert mix.evaluation == stdlib.evaluation + licenses.evaluation
    assert not set(mix.calibration) & set(mix.evaluation)


@needs_licenses
def test_evaluation_holds_out_only_what_calibrated_the_model():
    stdlib, licenses = load_text("stdlib"), load_text("licenses")
    docs, described = evaluation_documents("stdlib+licenses", calibration_source="stdlib")
    assert docs == stdlib.evaluation + licenses.whole  # licenses never calibrated: all of it
    assert "held-out" in described and "every document" in described
    docs, _ = evaluation_documents("licenses", calibration_source="stdlib+licenses")
    assert docs == licenses.evaluation  # part of the calibration mix: only its held-out share


def test_info_manuals_are_nodes_without_headers_menus_or_tag_table(tmp_path):
    import gzip

    from apt.text.corpora import info_manuals

    body = "The find program searches a directory tree for files matching criteria. " * 8
    text = (
        "This is find.info, produced by makeinfo.\n\n"
        "\x1f\nFile: find.info,  Node: Top,  Next: Intro\n\n" + body + "\n* Menu:\n\n"
        "\x1f\nFile: find.info,  Node: Intro,  Prev: Top\n\nshort node\n"
        "\x1f\nTag Table:\nNode: Top\x7f42\n\x1f\nEnd Tag Table\n"
    )
    (tmp_path / "find.info.gz").write_bytes(gzip.compress(text.encode()))
    assert info_manuals(tmp_path) == (body.strip(),)  # the short node is dropped, like any tiny document


def test_validation_and_test_halves_split_the_held_out_documents():
    from apt.text.sources import validation_split

    held_out = load_text("stdlib").evaluation
    validation, test = validation_split(held_out)
    assert set(validation).isdisjoint(test) and sorted(validation + test) == sorted(held_out)
    assert 0.3 < len(validation) / len(held_out) < 0.7
    assert validation_split(tuple(reversed(held_out)))[0] == tuple(reversed(validation))  # by content, not order


def test_an_encoder_calibrates_on_texts_framed_as_it_embeds_them_in_the_same_token_budget():
    from apt.models.loading import load_tokenizer, source_folder
    from apt.text.sources import SENTENCE_TOKENS, sentence_windows, token_windows

    tokenizer = load_tokenizer(source_folder("minilm-l6")[1])
    docs = load_text("stdlib").calibration
    windows = sentence_windows(docs, tokenizer, 4, 512, seed=3)
    # 4 × 512 tokens as 16 texts of 128: [CLS], 126 running tokens, [SEP]
    assert SENTENCE_TOKENS == 128 and windows.shape == (16, 128)
    assert bool((windows[:, 0] == tokenizer.cls_token_id).all()) and bool(
        (windows[:, -1] == tokenizer.sep_token_id).all()
    )
    assert torch.equal(windows[:, 1:-1], token_windows(docs, tokenizer, 16, 126, seed=3))
    # a shorter --max-seq-length is kept as it is, and its budget too
    assert sentence_windows(docs, tokenizer, 6, 64, seed=3).shape == (6, 64)
    # a tokenizer that frames nothing gives running windows of the same length
    plain = load_tokenizer(source_folder("smollm2-135m")[1])
    assert torch.equal(sentence_windows(docs, plain, 2, 256, seed=1), token_windows(docs, plain, 4, 128, seed=1))
    with pytest.raises(InvalidInputError, match="no room for text"):
        sentence_windows(docs, tokenizer, 4, 2)
