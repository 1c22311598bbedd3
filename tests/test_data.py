from nla.data import spread_rows


def test_spread_rows_draws_across_documents_and_is_seeded():
    doc_ids = [d for d in "aaaaaaaabbbbbbbbccccccccdddddddd"]  # 4 documents x 8 rows, in file order
    picked = spread_rows(doc_ids, 8, seed=0)
    assert picked == sorted(picked) and len(set(picked)) == 8
    assert sorted({doc_ids[i] for i in picked}) == ["a", "b", "c", "d"]  # first-8 would be one document
    assert all(sum(doc_ids[i] == d for i in picked) == 2 for d in "abcd")
    assert picked == spread_rows(doc_ids, 8, seed=0)
    assert spread_rows(doc_ids, 100) == list(range(32))
    assert len({doc_ids[i] for i in spread_rows(doc_ids, 3, seed=5)}) == 3
