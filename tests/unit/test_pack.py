import numpy as np
import pytest

from rayllm.data.pack import IGNORE_INDEX, pack, to_arrow


def docs(*lengths, start=1):
    out, nxt = [], start
    for n in lengths:
        out.append(np.arange(nxt, nxt + n, dtype=np.int32))
        nxt += n
    return out


def test_boundaries_doc_ids_and_padded_tail():
    p = pack(docs(3, 5, 1), seq_len=4, pad_id=0)
    assert p.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    # doc 1 starts in row 0 and continues as doc 0 of row 1; padding is -1
    assert p.doc_ids.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [0, -1, -1, -1]]
    assert p.labels.tolist()[2] == [9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert p.n_tokens.tolist() == [4, 4, 1]
    assert p.n_docs.tolist() == [2, 0, 1]


@pytest.mark.parametrize("seq_len", [1, 7, 64, 1000])
def test_no_token_lost_or_invented(seq_len):
    rng = np.random.default_rng(seq_len)
    lengths = rng.integers(1, 50, size=200)
    ds = docs(*lengths)
    p = pack(ds, seq_len=seq_len, pad_id=0)
    real = p.doc_ids >= 0
    assert p.n_tokens.sum() == lengths.sum() == real.sum()
    assert np.array_equal(p.input_ids[real], np.concatenate(ds))
    assert p.n_docs.sum() == len(lengths)
    assert len(p) == -(-lengths.sum() // seq_len)
    assert (p.labels[~real] == IGNORE_INDEX).all()
    # doc ids rise by one at each document start inside a row
    for row_ids, row_docs in zip(p.input_ids, p.doc_ids):
        assert (np.diff(row_docs[row_docs >= 0]) >= 0).all()


def test_custom_labels_and_empty_docs():
    ids = docs(3, 0, 2)
    labels = [np.array([IGNORE_INDEX, 2, 3]), np.array([], dtype=np.int32), np.array([IGNORE_INDEX, 5])]
    p = pack(ids, seq_len=8, pad_id=0, labels=labels)
    assert p.labels.tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5] + [IGNORE_INDEX] * 3]
    assert p.n_docs.tolist() == [2]


def test_arrow_layout():
    t = to_arrow(pack(docs(5), seq_len=4, pad_id=0))
    assert t.column_names == ["input_ids", "labels", "doc_ids", "n_tokens", "n_docs"]
    assert str(t.schema.field("input_ids").type) == "list<item: int32>"
    assert t.column("input_ids").to_pylist() == [[1, 2, 3, 4], [5, 0, 0, 0]]
